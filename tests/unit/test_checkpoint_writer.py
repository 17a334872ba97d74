"""Why ``model.cpu_patches.in_process_checkpoint_writes`` exists, per megatron-core version: what
it replaces must still be there (else drop that part)."""

import inspect


def test_upstream_writer_forks_or_threads_and_collects_through_a_manager_queue():
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    writer = fsa.FileSystemWriterAsync
    if "write_preloaded_data_multiproc" in writer.__dict__:        # 0.16: one fork per bucket
        assert 'get_context("fork")' in inspect.getsource(writer.write_preloaded_data_multiproc)
    else:                                                           # 0.19: threads, nothing to do
        assert "threading.Thread" in inspect.getsource(writer.write_preloaded_data_multithread)
    queue_fn = getattr(fsa, "_get_write_results_queue", None) or fsa.get_write_results_queue
    assert "Manager().Queue()" in inspect.getsource(queue_fn)       # a server process: replaced


def test_the_scoped_writer_patch_undoes_itself():
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    from megatron_rl.model.cpu_patches import in_process_checkpoint_writes

    before = dict(vars(fsa)), dict(fsa.FileSystemWriterAsync.__dict__)
    with in_process_checkpoint_writes():
        name = "_get_write_results_queue" if hasattr(fsa, "_get_write_results_queue") \
            else "get_write_results_queue"
        assert type(getattr(fsa, name)()).__module__ == "queue"
    assert dict(vars(fsa)) == before[0] and dict(fsa.FileSystemWriterAsync.__dict__) == before[1]


def test_exported_safetensors_get_the_mode_of_a_plain_new_file(tmp_path):
    import os
    import stat

    import torch

    from megatron_rl.checkpoint.hf_io import HFWriter

    for shard_bytes in (1 << 30, 8):          # one file, and shards with an index
        out = tmp_path / f"hf_{shard_bytes}"
        w = HFWriter(out, [("a.weight", (4,), torch.float32), ("b.weight", (4,), torch.float32)],
                     shard_bytes=shard_bytes)
        w.add("a.weight", torch.ones(4))
        w.add("b.weight", torch.zeros(4))
        w.close()
        umask = os.umask(0)
        os.umask(umask)
        for f in out.glob("*.safetensors"):
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_checkpoint_reads_run_without_the_cpu_modes_and_the_patch_undoes_itself():
    import torch
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.overrides import _get_current_function_mode_stack

    from megatron_rl.model.cpu_modes import CudaToCpu, enter_mode
    from megatron_rl.model.cpu_patches import checkpoint_reads_without_modes

    before = FileSystemReader.__dict__["read_data"]
    seen = []

    def spy(self, plan, planner):
        seen.append(list(_get_current_function_mode_stack()))
    FileSystemReader.read_data = spy
    leave = enter_mode(CudaToCpu())
    try:
        with checkpoint_reads_without_modes():
            FileSystemReader.read_data(None, None, None)
            outside = list(_get_current_function_mode_stack())
    finally:
        leave()
        FileSystemReader.read_data = before
    if torch.cuda.is_available():   # the modes are never entered with CUDA: nothing to drop
        return
    assert seen == [[]] and len(outside) == 1
