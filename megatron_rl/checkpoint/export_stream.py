"""The export of a distributed checkpoint one segment at a time, so a model larger than host
memory exports too: the model lives on the meta device, and each segment (the embedding, one
decoder layer, the final norm and output layer) is materialised, read from the checkpoint,
exported and released. Peak memory: one segment's shard plus the writer's tensor.

The reads are local to each rank (``partial_load``); the segments follow ``iter_hf_weights``'s
plan order, which every rank shares, so its per-tensor gathers still meet. The files are the
same bytes as the whole-model export (``tests/distributed/test_export_memory.py``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

from megatron_rl.checkpoint.dist_ckpt import load_model_part
from megatron_rl.checkpoint.hf_mapping import Mapping
from megatron_rl.checkpoint.hf_weights import _order_key, iter_hf_weights
from megatron_rl.checkpoint.partial_load import CheckpointReader
from megatron_rl.parallel.groups import ShardGroups


class _OnMeta(TorchFunctionMode):
    """Every tensor factory given a device builds on the meta device instead: megatron-core names
    its parameters' device explicitly, which ``torch.device("meta")`` alone does not override."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextmanager
def on_meta():
    """Build modules without memory: every parameter and buffer lands on the meta device. A
    function mode entered inside (and left on the stack) would be popped in place of ours."""
    from torch.overrides import _get_current_function_mode_stack

    mode = _OnMeta()
    with torch.device("meta"), mode:
        yield
        if _get_current_function_mode_stack()[-1] is not mode:
            raise RuntimeError("a torch function mode was entered while building on the meta "
                               "device; enter it before on_meta()")


def _segment(mapping: Mapping, name: str) -> Tuple[int, int]:
    """Embedding (0, 0), decoder layer L (1, L), final norm and output layer (2, 0)."""
    return _order_key(mapping, name)[:2]


def _place(model, entries, device: str):
    """``entries`` (``LocalTensor``) re-created empty on ``device`` in their modules (a meta
    tensor's storage cannot be swapped in place); returns the entries holding the new tensors."""
    out = []
    for e in entries:
        path, _, attr = e.local_name.rpartition(".")
        module = model.get_submodule(path)
        old = e.tensor
        new = torch.empty(old.shape, dtype=old.dtype, device=device)
        if attr in module._parameters:
            new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
            for k, v in vars(old).items():   # megatron-core's tags (allreduce, tensor_model_parallel, ...)
                setattr(new, k, v)
            module._parameters[attr] = new
        else:
            module._buffers[attr] = new
        out.append(dataclasses.replace(e, tensor=new))
    return out


def _trim_heap() -> None:
    """Hand the freed heap back to the OS (glibc): a segment's tensors and the Python objects of
    its load interleave in the heap, and without this the resident memory grows by a few MB per
    segment although nothing stays alive. A no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@torch.no_grad()
def stream_hf_weights(model, ckpt: Path, mapping: Mapping, groups: ShardGroups, num_experts: int,
                      planned, dst: Optional[int] = None,
                      device: str = "cpu") -> Iterator[Tuple[str, torch.Tensor]]:
    """``iter_hf_weights`` of a meta-device ``model`` whose weights are in ``ckpt``: each segment
    is materialised, loaded (collective), yielded and released before the next. ``planned``:
    ``hf_plan``'s result for this model."""
    plan, local = planned
    reader = CheckpointReader(ckpt)
    for _, items in itertools.groupby(plan, key=lambda item: _segment(mapping, item[0])):
        items = list(items)
        mine = _place(model, [local[name] for name, *_ in items if name in local], device)
        try:
            load_model_part(ckpt, model, {e.local_name for e in mine}, reader)
            yield from iter_hf_weights(model, mapping, groups, num_experts, dst=dst,
                                       planned=(items, {e.name: e for e in mine}))
        finally:
            _place(model, mine, "meta")
            del mine
            _trim_heap()
