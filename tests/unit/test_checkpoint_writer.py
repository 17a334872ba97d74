"""Why ``model.cpu_patches.in_process_checkpoint_writes`` exists."""


def test_upstream_checkpoint_writer_still_forks():
    # why model.cpu_patches.in_process_checkpoint_writes exists; drop it when this fails
    import inspect

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    src = inspect.getsource(FileSystemWriterAsync.write_preloaded_data_multiproc)
    assert 'get_context("fork")' in src
