"""On CPU, megatron-core's hard-coded CUDA calls are answered by two process-wide torch-function
modes (model/cpu_patches.py). Every torch call under them costs a Python dispatch, so everything
that is not megatron-core's own code runs with them suspended: vLLM generation, rewards, batch
building, weight sync, and inside Megatron's schedule the model's forward and our loss functions.
A real two-step trainer run records the mode depth at the start of each."""

import pytest
import torch

from tests.distributed.harness import spawn


@pytest.mark.skipif(torch.cuda.is_available(), reason="the modes exist only on CPU")
def test_only_the_megatron_phases_run_under_the_cpu_function_modes(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (CPU: pip install -e '.[cpu]')")
    from tests.distributed import mode_workers

    r = spawn(mode_workers.modes_by_phase, 1, str(tmp_path / "run"))
    assert r["code"] == 0, r
    assert r["megatron"] == [2], r      # the watch sees the modes where Megatron needs them
    for phase in ("generate", "rewards", "batch", "sync", "forward", "loss"):
        assert r[phase] == [0], (phase, r)
