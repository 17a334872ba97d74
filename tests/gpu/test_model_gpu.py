"""GPU checks (bf16). Skipped, with the reason, without CUDA. Written without a GPU lent to run
them (see the issue-4 note): the first GPU session runs them and records bench/moe_step.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_fused_logprob_entropy_on_gpu_in_bf16_matches_fp32_log_softmax():
    from megatron_rl.parallel.vocab_parallel import vocab_parallel_logprobs

    z = (torch.randn(4096, 32000, device="cuda") * 3).bfloat16().requires_grad_()
    t = torch.randint(0, 32000, (4096,), device="cuda")
    lp, ent = vocab_parallel_logprobs(z, t)
    ls = torch.log_softmax(z.detach().float(), -1)
    assert torch.allclose(lp, ls.gather(1, t[:, None]).squeeze(1), atol=1e-4)
    assert torch.allclose(ent, -(ls.exp() * ls).sum(-1), atol=1e-3)
    (lp.sum() + ent.sum()).backward()
    assert z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad.float()).all()



def test_rl_training_step_runs_on_gpu_in_bf16_with_device_batches(tmp_path):
    """The whole GPU step: batches built on the device, the bf16 MoE under Megatron's schedule,
    our loss and Megatron's distributed optimizer (fp32 main weights), through bench/moe_step.py
    in a fresh process (NCCL, world 1)."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "step.json"
    env = dict(os.environ, PYTHONPATH=str(root))
    subprocess.run([sys.executable, str(root / "bench" / "moe_step.py"), "--size", "tiny",
                    "--seq-len", "512", "--steps", "2", "--json", str(out)],
                   check=True, env=env, timeout=600)
    res = json.loads(out.read_text())
    for kind in ("baseline", "ours"):
        assert res[kind]["tokens_per_s"] > 0 and res[kind]["peak_gib"] > 0
    assert res["ours_over_baseline_time"] < 3.0  # our loss must not dominate the step
