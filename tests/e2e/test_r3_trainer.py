"""Stable MoE RL through the CLI (vLLM CPU build, Megatron-Core): the engine's expert routes
replayed in training (R3) with every train/inference correction on, resumed bit-identically; and
at DP 2 with the engine's log-probs as the behaviour policy, where each rank's routes reach it
from the engine that sampled them."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from tests.e2e.run_outputs import metrics, weights

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPES = ROOT / "configs" / "recipes"
SMALL = ["train.prompts_per_step=4", "rollout.n_samples_per_prompt=4", "train.micro_batch_size=8",
         "train.loggers=[]", "rollout.probe_every=0"]


def _run(out, steps, *extra, recipe="tiny_moe_r3", world=1):
    args = ["-m", "megatron_rl", "train", "--config", str(RECIPES / f"{recipe}.yaml"),
            f"train.output_dir={out}", f"train.steps={steps}", *SMALL, *extra]
    cmd = [sys.executable, *args] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        f"--nproc-per-node={world}", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_r3_with_every_correction_trains_and_resumes_bit_identically(tmp_path):
    _run(tmp_path / "straight", 3)
    _run(tmp_path / "split", 2, "train.checkpoint_every=1")
    r = _run(tmp_path / "split", 3, "train.checkpoint_every=1")
    assert "resumed from step 2" in r.stderr
    straight, split = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert straight == split
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    for row in straight:
        assert row["r3/missing_frac"] == 0.0 and row["r3/route_agreement"] >= 0.999
        assert row["train/updates"] == 2.0 and row["mismatch/mean"] < 1e-4
        for key in ("tis_capped_frac", "icepop_masked_frac", "mis_masked_frac", "tr_masked_frac"):
            assert 0.0 <= row[f"train/{key}"] <= 1.0, key
        assert {"mismatch/k1", "mismatch/k3", "mismatch/k3/max"} <= row.keys()


def test_dp2_engine_logprobs_as_behaviour_with_replayed_routes(tmp_path):
    """One engine over both ranks (TP 2), two data-parallel trainer ranks: each gets its groups'
    routes from the engine's first rank. No old-policy pass runs (behaviour = the engine's)."""
    _run(tmp_path / "run", 2, "algo.mismatch.behaviour=rollout", "algo.mismatch.tis_cap=null",
         "algo.mismatch.icepop=null", "algo.mismatch.mis=null", "algo.mismatch.tr_max_kl=null",
         "rollout.tensor_parallel_size=2", "train.export_hf=false", "train.micro_batch_size=4",
         world=2)
    rows = metrics(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["r3/missing_frac"] == 0.0 and row["r3/route_agreement"] >= 0.999
        assert row["mismatch/mean"] < 1e-4 and row["train/updates"] == 2.0
