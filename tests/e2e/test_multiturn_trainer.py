"""Multi-turn episodes through the CLI with the real engine (vLLM CPU build) and Megatron-Core:
the trainer's sequences are the engine's (its log-probs on every action token agree with the
engine's), environment tokens are counted, and at context parallel 2 (engine TP 2: the engine's
ranks kept in step by ``EngineChannel``) with packed sequences the run equals CP 1: the same
episodes and rewards, and the action-indexed future-KL statistics (pooled across CP ranks)
give the same losses."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.e2e.run_outputs import metrics

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPES = ROOT / "configs" / "recipes"
SMALL = ["train.prompts_per_step=4", "rollout.n_samples_per_prompt=4", "train.micro_batch_size=8",
         "train.loggers=[]", "train.export_hf=false"]
# future-KL GRPO on the copy task, with two tool turns whose observations are as long as the action
ECHO = ["env.module=tests/e2e/multiturn_env.py", "env.name=e2e_echo", "env.max_turn_tokens=3",
        "rollout.max_response_len=16", "rollout.probe_every=1", *SMALL]


def _run(out, steps, cp, *extra, recipe="tiny_moe_future_kl_grpo"):
    args = ["-m", "megatron_rl", "train", "--config", str(RECIPES / f"{recipe}.yaml"),
            f"train.output_dir={out}", f"train.steps={steps}", *extra]
    if cp == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               "--nproc-per-node=2", *args, "parallel.context_parallel_size=2",
               "rollout.tensor_parallel_size=2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_tool_recipe_episodes_are_the_engines_token_for_token(tmp_path):
    # with DAPO dynamic sampling (refill rounds of episodes) and overlong shaping
    _run(tmp_path / "run", 2, 1, *SMALL, "algo.dynamic_sampling=true", "rollout.oversample=2",
         "algo.overlong.buffer_len=4", recipe="tiny_moe_tool")
    rows = metrics(tmp_path / "run")
    for r in rows:
        assert r["env/turns_mean"] >= 1.0 and r["env/failed_frac"] == 0.0
        assert r["rollout/groups_drawn"] >= 8 and r["rollout/rounds"] >= 1
        assert r["mismatch/mean"] < 1e-4     # a token shifted by one would be ~1 nat off
    assert "env/env_token_share" in rows[0] and "env/tool_calls_mean" in rows[0]
    # `megatron-rl eval` plays the recipe's episodes too (the engine's starting weights here)
    ev = subprocess.run([sys.executable, "-m", "megatron_rl", "eval", "--config",
                         str(RECIPES / "tiny_moe_tool.yaml"), "--model", str(tmp_path / "run" / "hf_init"),
                         "--prompts", "4", "--n", "2", "--temperature", "1"], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads(ev.stdout.strip().splitlines()[-1])
    assert report["samples"] == 8 and report["failures"] == 0 and 1 <= report["length_mean"] <= 16


def test_multi_turn_at_cp2_with_engine_tp2_equals_cp1(tmp_path):
    packed = ["train.pack_sequences=true", *ECHO]
    _run(tmp_path / "cp2", 2, 2, *packed)
    _run(tmp_path / "cp1", 2, 1, *packed)
    cp2, cp1 = metrics(tmp_path / "cp2"), metrics(tmp_path / "cp1")
    for a, b in zip(cp2, cp1):
        assert a["env/turns_mean"] > 2.5 and a["env/env_token_share"] > 0.2
        assert a["mismatch/mean"] < 1e-4
        # the recipe replays the engine's routes (R3): every turn's, merged per episode, arrive
        # for every token the engine ran, and Megatron's routers (before replay) agree with them
        assert a["r3/missing_frac"] == 0.0 and a["r3/route_agreement"] >= 0.999
        for k in a:
            # per-rank values, timings, and the layout's padding (CP pads to a multiple of 2 cp)
            if k.startswith(("moe/imbalance", "mismatch/max", "sync/probe_mismatch/max", "mem/",
                             "time/", "perf/", "sync/seconds", "batch/pad_frac")):
                continue
            if k.startswith(("reward/", "response/", "rollout/", "env/")):
                assert a[k] == b[k], (a["step"], k, a[k], b[k])       # the same episodes
            else:
                assert abs(a[k] - b[k]) <= 1e-5 + 1e-4 * abs(b[k]), (a["step"], k, a[k], b[k])
