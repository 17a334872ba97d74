"""The trainer scored by a learned reward model (recipe ``tiny_moe_rm``), through the CLI: GSPO
raises the model's mean score; at context parallel 2 (the reward model sharded like the policy,
world 2 under torchrun) the scores equal one process's; the running normaliser resumes from a
checkpoint bit-identically."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.e2e.run_outputs import metrics, weights

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "recipes" / "tiny_moe_rm.yaml"
NORMALISED = ["reward.model.normalize=running", "reward.model.clip=2.0", "train.loggers=[]"]


def _run(out: pathlib.Path, steps: int, *extra: str, world: int = 1):
    args = ["-m", "megatron_rl", "train", "--config", str(RECIPE), f"train.output_dir={out}",
            f"train.steps={steps}", *extra]
    if world == 1:
        cmd = [sys.executable, *args]
    else:   # on CPU a MoE engine spans the world (docs/training.md)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc-per-node={world}", *args, f"rollout.tensor_parallel_size={world}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_gspo_against_the_tiny_reward_model_raises_its_score_and_eval_scores_with_it(tmp_path):
    out = tmp_path / "run"
    _run(out, 40, "train.loggers=[]")
    rows = metrics(out)
    curve = [r["reward/model_mean"] for r in rows]
    assert all(r["reward/mean"] == r["reward/model_mean"] for r in rows)   # weight 1, raw
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last > first + 0.2, curve
    assert (out / "tiny_rm" / "config.json").is_file()   # made on first use

    # `megatron-rl eval` of the export scores with the reward model too (raw: no normaliser)
    from megatron_rl.rewards.tiny_rm import digit_score

    ev = subprocess.run([sys.executable, "-m", "megatron_rl", "eval", "--config", str(RECIPE),
                         "--model", str(out / "hf"), "--prompts", "4", "--n", "2", "--temperature", "1",
                         f"train.output_dir={out}", "--samples", str(tmp_path / "ev.jsonl")],
                        cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ev.returncode == 0, ev.stderr[-3000:]
    dumped = [json.loads(ln) for ln in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert len(dumped) == 8
    assert all(abs(d["reward"] - digit_score(d["response"])) < 0.1 for d in dumped), dumped


def test_reward_model_at_cp2_equals_one_process_and_its_normaliser_resumes(tmp_path):
    _run(tmp_path / "cp2", 3, *NORMALISED, "parallel.context_parallel_size=2", world=2)
    _run(tmp_path / "one", 3, *NORMALISED)
    cp2, one = metrics(tmp_path / "cp2"), metrics(tmp_path / "one")
    for a, b in zip(cp2, one):
        for k in ("reward/model_mean", "reward/model_std", "reward/mean", "reward/std"):
            assert abs(a[k] - b[k]) <= 1e-6 + 1e-5 * abs(b[k]), (a["step"], k, a[k], b[k])
    assert max(abs(r["reward/mean"]) for r in one) < 2.0   # normalised, not the raw 0..1 score

    resumed = tmp_path / "resumed"
    _run(resumed, 2, *NORMALISED, "train.checkpoint_every=2")
    r = _run(resumed, 3, *NORMALISED, "train.checkpoint_every=2")
    assert "resumed from step 2" in r.stderr
    assert metrics(resumed) == one
    wa, wb = weights(resumed), weights(tmp_path / "one")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
