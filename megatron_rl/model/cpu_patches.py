"""Every monkeypatch megatron-core needs to run on a CPU-only PyTorch build, in one place.

``apply_cpu_patches()`` does nothing when CUDA is available. On CPU it applies each patch that the
installed megatron-core needs (``CpuPatch.needed``: detected from the code, not from a version
number), once; each records how to undo itself (``revert_cpu_patches``), so
``tests/distributed/test_cpu_patches.py`` can run a scenario with every patch but one and check
that upstream still fails with the error the patch's docstring names, and that a patch this
version does not need really is not needed. When a test there fails, upstream fixed the problem:
gate or delete the patch.

Written against megatron-core 0.16.1 (the newest for Python 3.11) and 0.19 (Python 3.12, the GPU
images); each docstring says where and which versions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
from megatron_rl.model.cpu_modes import CudaToCpu, CudaTypeNames, cpu_modes_suspended, enter_mode
from megatron_rl.parallel.collectives import reduce_scatter_single

Undo = Callable[[], None]
# a CUDA call without CUDA: torch's CPU build says the first, a CUDA build without a GPU the second
NO_CUDA = ("Torch not compiled with CUDA enabled", "Found no NVIDIA driver")


@dataclass(frozen=True)
class CpuPatch:
    """One megatron-core CPU shim: the errors it avoids, where upstream raises them, and how to
    apply it."""
    name: str
    errors: Tuple[str, ...]    # what upstream raises without the patch (any of these substrings)
    where: str                 # the megatron-core function that raises it (module path:function)
    apply: Callable[[], Undo]
    needed: Callable[[], bool]  # does the installed megatron-core still have the problem?

    def explains(self, failure: str) -> bool:
        """``failure``: ``"Type: message @ module:function"`` of a step run without the patch."""
        return any(e in failure for e in self.errors) and failure.endswith(f"@ {self.where}")


CPU_PATCHES: Dict[str, CpuPatch] = {}
_APPLIED: Dict[str, Undo] = {}


def _always() -> bool:
    return True


def _patch(name: str, error: Union[str, Tuple[str, ...]], where: str,
           needed: Callable[[], bool] = _always):
    def register(fn: Callable[[], Undo]):
        """File the patch function under its name with the errors it avoids."""
        errors = (error,) if isinstance(error, str) else tuple(error)
        CPU_PATCHES[name] = CpuPatch(name, errors, where, fn, needed)
        return fn
    return register


def _set(obj, attr: str, value, undo: List[Undo]) -> None:
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    undo.append(lambda: setattr(obj, attr, old))


def _undo_all(undo: List[Undo]) -> Undo:
    return lambda: [u() for u in reversed(undo)]


def apply_cpu_patches(skip: Sequence[str] = ()) -> List[str]:
    """Apply every CPU patch that this megatron-core needs and is not in ``skip`` (none when CUDA
    is available); returns the names applied."""
    if torch.cuda.is_available():
        return []
    for name, p in CPU_PATCHES.items():
        if name not in skip and name not in _APPLIED and p.needed():
            _APPLIED[name] = p.apply()
    return list(_APPLIED)


def revert_cpu_patches() -> None:
    """Undo every applied CPU patch, newest first."""
    for name in reversed(list(_APPLIED)):
        _APPLIED.pop(name)()


@_patch("rng", NO_CUDA,
        "tensor_parallel/random.py:add")
def _rng() -> Undo:
    """``model_parallel_cuda_manual_seed`` -> ``CudaRNGStatesTracker.add`` calls
    ``torch.cuda.get_rng_state`` (tensor_parallel/random.py, 0.16.1): "AssertionError: Torch not
    compiled with CUDA enabled". Keep the tracker's named states as CPU generator states."""
    import megatron.core.tensor_parallel.random as R

    def add(self, name, seed):
        """Register a named RNG state seeded with ``seed`` (a seed twice is an error, as upstream)."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name=R._MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Run the body with the named state in the CPU generator, restoring the default state
        after."""
        # the named state stands for a CUDA generator: swap it in and out of the CPU generator so
        # the default CPU stream is left as it was (upstream warns when it changes)
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

    undo: List[Undo] = []
    _set(R.CudaRNGStatesTracker, "fork", fork, undo)
    _set(R, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state(), undo)
    _set(R, "_set_cuda_rng_state", lambda new_state, *a, **k: torch.set_rng_state(new_state), undo)
    _set(R.CudaRNGStatesTracker, "add", add, undo)
    return _undo_all(undo)


@_patch("curdev", NO_CUDA,
        "tensor_parallel/layers.py:__init__")
def _curdev() -> Undo:
    """Embeddings, linear layers, rotary embeddings and the global memory buffer allocate on
    ``torch.cuda.current_device()`` (0.16.1): "AssertionError: Torch not compiled with CUDA
    enabled". Report the CPU instead."""
    undo: List[Undo] = []
    _set(torch.cuda, "current_device", lambda: torch.device("cpu"), undo)
    return _undo_all(undo)


def _lacks_te_general_gemm() -> bool:
    import megatron.core.transformer.moe.moe_utils as M

    return not hasattr(M, "te_general_gemm")


@_patch("tegemm", "name 'te_general_gemm' is not defined",
        "transformer/moe/moe_utils.py:forward", needed=_lacks_te_general_gemm)
def _tegemm() -> Undo:
    """0.16.1 bug without TransformerEngine (CPU or GPU): the MoE router's
    ``RouterGatingLinearFunction.forward`` reads ``te_general_gemm``, which is only imported when TE
    is: "NameError: name 'te_general_gemm' is not defined". Fixed upstream by 0.19 (the name is
    defined, None without TE): needed where it is missing, where it is defined as None."""
    import megatron.core.transformer.moe.moe_utils as M

    M.te_general_gemm = None
    return lambda: delattr(M, "te_general_gemm")


@_patch("spnorm", "sequence parallel not supported by torch LayerNorm",
        "transformer/torch_norm.py:__new__")
def _spnorm() -> Undo:
    """MoE with TP > 1 requires sequence parallelism, but without TE/Apex the local spec's torch
    norms refuse it (transformer/torch_norm.py, 0.16.1): "AssertionError: sequence parallel not
    supported by torch LayerNorm". Build the torch norm and mark its parameters
    ``sequence_parallel`` so their gradients are all-reduced over TP, as for TE/Apex norms."""
    import megatron.core.transformer.torch_norm as TN

    orig = TN.WrappedTorchNorm.__new__

    def new(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        """Build the torch norm with the flag off (upstream refuses it), restore the flag, and mark
        the parameters ``sequence_parallel``."""
        sp = config.sequence_parallel
        config.sequence_parallel = False
        try:
            norm = orig(cls, config, hidden_size, eps, *args, **kwargs)
        finally:
            config.sequence_parallel = sp
        for p in norm.parameters():
            p.sequence_parallel = sp
        return norm

    undo: List[Undo] = []
    _set(TN.WrappedTorchNorm, "__new__", staticmethod(new), undo)
    return _undo_all(undo)


class _NoStream:
    """Stands in for CUDA streams and events: CPU work is synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        """No-op: CPU work is ordered already."""
        pass

    def wait_event(self, *args, **kwargs):
        """No-op: CPU work is ordered already."""
        pass

    def synchronize(self):
        """No-op: CPU work is synchronous."""
        pass

    def record(self, *args, **kwargs):
        """No-op: there is no device queue to mark."""
        pass

    def wait(self, *args, **kwargs):
        """No-op: CPU work is ordered already."""
        pass

    def query(self):
        """Always done: CPU work is synchronous."""
        return True

    def record_event(self, *args, **kwargs):
        """A no-op event."""
        return _NoStream()

    def elapsed_time(self, other):
        """Zero: no device time is measured on CPU."""
        return 0.0


@_patch("stream", NO_CUDA,
        "transformer/moe/token_dispatcher.py:_maybe_dtoh_and_synchronize")
def _stream() -> Undo:
    """The all-to-all token dispatcher moves its routing metadata to the host on a side CUDA
    stream (``_maybe_dtoh_and_synchronize`` in transformer/moe/token_dispatcher.py, 0.16.1), which
    initialises CUDA: "AssertionError: Torch not compiled with CUDA enabled" (torch 2.13; older
    builds: "torch.cuda.Stream requires CUDA support"). Replace streams and events with no-ops."""
    undo: List[Undo] = []
    _set(torch.cuda, "Stream", _NoStream, undo)
    _set(torch.cuda, "Event", _NoStream, undo)
    _set(torch.cuda, "current_stream", lambda *a, **k: _NoStream(), undo)
    _set(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext(), undo)
    return _undo_all(undo)


@_patch("a2a_splits", "all_to_all_single(): incompatible function arguments",
        "tensor_parallel/mappings.py:forward")
def _a2a_splits() -> Undo:
    """With EP > 1 the all-to-all dispatcher passes split sizes through
    ``moe_utils.maybe_move_tensor_to_cpu(as_numpy=True)``, which converts only CUDA tensors, so on
    CPU torch tensors reach ``all_to_all_single`` (0.16.1): "TypeError: all_to_all_single():
    incompatible function arguments". Convert CPU tensors too."""
    import megatron.core.transformer.moe.moe_utils as M
    import megatron.core.transformer.moe.token_dispatcher as TD

    orig = M.maybe_move_tensor_to_cpu

    def move(tensor, as_numpy=False, record_stream=False):
        """A CPU tensor is already on the host: returned as is (or as numpy); others go upstream."""
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return orig(tensor, as_numpy=as_numpy, record_stream=record_stream)

    undo: List[Undo] = []
    _set(M, "maybe_move_tensor_to_cpu", move, undo)
    _set(TD, "maybe_move_tensor_to_cpu", move, undo)
    return _undo_all(undo)


@_patch("uneven", "invalid tensor size",
        "tensor_parallel/mappings.py:_gather_along_first_dim")
def _uneven() -> Undo:
    """With TP > 1 and EP > 1 the dispatcher gathers and reduce-scatters *uneven* per-rank token
    counts (tensor_parallel/mappings.py, 0.16.1); NCCL accepts that, gloo does not:
    "RuntimeError: ProcessGroupGloo::allgather: invalid tensor size". Pad to the largest share,
    use the even collective, slice."""
    import megatron.core.tensor_parallel.mappings as MP

    gather0, scatter0 = MP._gather_along_first_dim, MP._reduce_scatter_along_first_dim

    def padded(x, n):
        """``x`` padded with zero rows to ``n`` rows."""
        out = x.new_zeros((n,) + tuple(x.shape[1:]))
        out[: x.shape[0]] = x
        return out

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        """All-gather of uneven first dimensions: pad to the largest, gather, cut each back."""
        if output_split_sizes is None or group.size() == 1:
            return gather0(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        outs = [input_.new_empty((max(sizes),) + tuple(input_.shape[1:])) for _ in sizes]
        torch.distributed.all_gather(outs, padded(input_, max(sizes)), group=group)
        return torch.cat([o[:n] for o, n in zip(outs, sizes)], dim=0)

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        """Reduce-scatter of uneven first dimensions: pad each part to the largest, reduce-scatter,
        cut."""
        if input_split_sizes is None or group.size() == 1:
            return scatter0(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(s) for s in input_split_sizes]
        m = max(sizes)
        stacked = torch.cat([padded(c, m) for c in torch.split(input_, sizes, dim=0)])
        out = input_.new_empty((m,) + tuple(input_.shape[1:]))
        reduce_scatter_single(out, stacked, group=group)
        return out[: sizes[group.rank()]]

    undo: List[Undo] = []
    _set(MP, "_gather_along_first_dim", gather, undo)
    _set(MP, "_reduce_scatter_along_first_dim", reduce_scatter, undo)
    return _undo_all(undo)


def _te_linear_is_not_a_type() -> bool:
    import megatron.core.transformer.multi_latent_attention as MLA

    # 0.16 believes TE is there (HAVE_TE) and gets a mock; 0.19 sees it is not and skips the check
    return bool(MLA.HAVE_TE) and not isinstance(MLA.TELinear, type)


@_patch("telinear", "isinstance() arg 2 must be a type",
        "transformer/multi_latent_attention.py:__init__", needed=_te_linear_is_not_a_type)
def _telinear() -> Undo:
    """Without TransformerEngine, multi-latent attention (DeepSeek-V3) checks
    ``isinstance(self.linear_proj, TELinear)`` against the mock megatron-core puts in TE's place
    (transformer/multi_latent_attention.py, 0.16.1): "TypeError: isinstance() arg 2 must be a
    type". Put a class that nothing is an instance of there instead. 0.19 no longer needs it
    (without TE its ``HAVE_TE`` is False, which guards the check)."""
    import megatron.core.transformer.multi_latent_attention as MLA

    undo: List[Undo] = []
    _set(MLA, "TELinear", type("NoTransformerEngineLinear", (), {}), undo)
    return _undo_all(undo)


@_patch("devmode", NO_CUDA,
        "optimizer/optimizer.py:__init__")
def _devmode() -> Undo:
    """Hard-coded ``device="cuda"`` and ``.cuda()`` in every pipeline schedule
    (``total_num_tokens = torch.zeros([], ..., device="cuda")``, pipeline_parallel/schedules.py),
    the optimizer (``found_inf``, ``_scale_one``), clip_grads and checkpoint exchange (0.16.1):
    "AssertionError: Torch not compiled with CUDA enabled". A process-wide function mode maps
    CUDA devices to the CPU and drops ``pin_memory``."""
    return enter_mode(CudaToCpu())


@_patch("sync", NO_CUDA,
        "pipeline_parallel/p2p_communication.py:_communicate")
def _sync() -> Undo:
    """``torch.cuda.synchronize()`` after pipeline send/recv (pipeline_parallel/
    p2p_communication.py with ``batch_p2p_sync``), in parallel_state and timers (0.16.1):
    "AssertionError: Torch not compiled with CUDA enabled". CPU work is synchronous: no-op."""
    undo: List[Undo] = []
    _set(torch.cuda, "synchronize", lambda *a, **k: None, undo)
    return _undo_all(undo)


@_patch("typestr", "Wrapped parameters must be one of torch.cuda.FloatTensor",
        "optimizer/distrib_optimizer.py:_build_model_and_main_param_groups")
def _typestr() -> Undo:
    """The distributed optimizer and grad clipping dispatch on ``param.type()`` strings
    (optimizer/distrib_optimizer.py ``_build_model_and_main_param_groups``, optimizer/
    clip_grads.py, 0.16.1): "TypeError: Wrapped parameters must be one of
    torch.cuda.FloatTensor, ...". A function mode makes a CPU tensor's ``type()`` report the
    ``torch.cuda.*`` name."""
    return enter_mode(CudaTypeNames())


def _write_buckets_in_process(transform_list, use_msc, rank, write_buckets, global_results_queue):
    """``FileSystemWriterAsync.write_preloaded_data_multiproc`` (0.16) without the worker processes."""
    import queue

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    results = {}
    for i, bucket in enumerate(write_buckets):
        local, count = queue.Queue(), queue.Queue()
        count.put(i)
        with cpu_modes_suspended():   # torch.save per item: no Megatron, ~50 torch calls each
            FileSystemWriterAsync.write_preloaded_data(transform_list, i, bucket, local, count,
                                                       True, use_msc=use_msc)
        idx, out = local.get()
        if isinstance(out, Exception):
            global_results_queue.put(out)
            return
        results[idx] = out
    global_results_queue.put(results)


@contextlib.contextmanager
def in_process_checkpoint_writes():
    """Scoped, CPU only: megatron-core's ``torch_dist`` checkpoint writer runs without helper
    processes. Not a global patch: only our saves need it, and on GPU the upstream writer is kept.

    * 0.16 forks one process per write bucket (``write_preloaded_data_multiproc``,
      ``mp.get_context("fork")`` in dist_checkpointing/strategies/filesystem_async.py) from a
      process that runs gloo and OpenMP threads; a child forked while another thread holds a lock
      hangs forever (seen in CI: a save that never returned). The buckets are written in the
      calling process instead. 0.19 writes them in threads (``write_preloaded_data_multithread``)
      and needs nothing here.
    * Both collect the results in a ``multiprocessing.Manager().Queue()`` (0.16
      ``_get_write_results_queue``, 0.19 ``get_write_results_queue``): the manager is a spawned
      server process that outlives a trainer killed with SIGKILL (one orphan of ~270 MB per crash,
      found by the crash test). A plain ``queue.Queue`` serves, since nothing crosses processes.

    ``tests/unit/test_checkpoint_writer.py`` checks which of the two the installed version has."""
    if torch.cuda.is_available():
        yield
        return
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    undo: List[Undo] = []
    writer, attr = fsa.FileSystemWriterAsync, "write_preloaded_data_multiproc"
    if attr in writer.__dict__:
        orig = writer.__dict__[attr]                       # the staticmethod object itself
        setattr(writer, attr, staticmethod(_write_buckets_in_process))
        undo.append(lambda: setattr(writer, attr, orig))
    name = "_get_write_results_queue" if hasattr(fsa, "_get_write_results_queue") \
        else "get_write_results_queue"
    _set(fsa, name, lambda *a, **k: queue.Queue(), undo)
    try:
        yield
    finally:
        _undo_all(undo)()


@contextlib.contextmanager
def checkpoint_reads_without_modes():
    """Scoped, CPU only: PyTorch's ``FileSystemReader.read_data`` (every item of a ``torch_dist``
    checkpoint unpickled with ``torch.load``, then copied into its target) runs without the
    function modes the patches entered. It has no Megatron in it, and each torch call pays ~4 us
    under a Python mode: 168,000 of the 776,000 mode calls of a 3,072-expert model's export."""
    if torch.cuda.is_available():
        yield
        return
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    orig = FileSystemReader.__dict__["read_data"]

    def read_data(self, plan, planner):
        """``FileSystemReader.read_data`` with the CPU modes suspended."""
        with cpu_modes_suspended():
            return orig(self, plan, planner)
    FileSystemReader.read_data = read_data
    try:
        yield
    finally:
        FileSystemReader.read_data = orig
