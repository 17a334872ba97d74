"""Separate placement through the CLI (vLLM CPU build on engine ranks of their own, Megatron on the
others): synchronous, it is the colocated run number for number; one step off, it trains on the
previous policy's rollouts, and a kill -9 during generation or during a weight transfer resumes
bit-identically (the in-flight step is in the checkpoint)."""

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
         "train.loggers=[]", "rollout.probe_every=0", "train.export_hf=false",
         "train.checkpoint_every=2"]
SEPARATE = ["rollout.placement=separate", "rollout.engine_ranks=1"]
# dynamic sampling draws a varying number of prompts: the engines' sampler state must travel
ONE_OFF = [*SEPARATE, "rollout.max_staleness=1", "algo.mismatch.tis_cap=2.0",
           "algo.dynamic_sampling=true", "rollout.oversample=1.5", "train.samples_every=1",
           "data.val_path=synthetic:copy", "train.val_every=3", "train.val_prompts=4"]
VAL = ["data.val_path=synthetic:copy", "train.val_prompts=4", "train.val_n=2"]


def _run(out, steps, *extra, world=1, kill_at="", ok=True, recipe="tiny_moe_gspo"):
    args = ["-m", "megatron_rl", "train", "--config", str(RECIPES / f"{recipe}.yaml"),
            f"train.output_dir={out}",
            f"train.steps={steps}", *SMALL, *extra]
    cmd = [sys.executable, *args] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        f"--nproc-per-node={world}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MEGATRON_RL_KILL_AT", None)
    if kill_at:
        env["MEGATRON_RL_KILL_AT"] = kill_at
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _val_by_version(rows, key: str = "val/reward_mean") -> dict:
    """Separate placement: each validation's ``key`` by the version it validated."""
    return {int(r["val/version"]): r[key] for r in rows if "val/version" in r}


def test_synchronous_separate_placement_equals_colocated(tmp_path):
    """One engine rank + one trainer rank at max_staleness 0 against the same engine and trainer
    in one process: the same rewards every step, the same loss, the same validation of every
    version (validated on the engine rank: versions 1 and 2 reported with the next step's
    rollouts, version 3, which no step is sampled by, streamed for its validation alone)."""
    _run(tmp_path / "colocated", 3, *VAL, "train.val_every=1")
    r = _run(tmp_path / "separate", 3, *SEPARATE, *VAL, "train.val_every=1", world=2)
    assert "on 1 rank(s) of their own, 0 step(s) off-policy" in r.stderr
    a = metrics(tmp_path / "colocated")
    every = metrics(tmp_path / "separate")
    b = [row for row in every if "train/loss" in row]   # less version 2's validation row
    assert len(every) == len(b) + 1
    for key in ("val/reward_mean", "val/pass@2", "val/response_length_mean"):
        assert _val_by_version(every, key) == {row["step"]: row[key] for row in a}, key
    assert [row["reward/mean"] for row in a] == [row["reward/mean"] for row in b]
    for x, y in zip(a, b):
        assert abs(x["train/loss"] - y["train/loss"]) <= 1e-5
        assert y["async/staleness/max"] == 0.0
    assert b[1]["async/weight_transfer_MB"] > 0.5   # the whole tiny model, streamed


def test_multi_turn_episodes_are_played_on_the_engine_ranks_as_colocated(tmp_path):
    """The tool recipe's episodes (engine turns and tool observations) under separate placement,
    synchronous: the same rewards, environment counters and loss as colocated."""
    _run(tmp_path / "colocated", 2, recipe="tiny_moe_tool")
    _run(tmp_path / "separate", 2, *SEPARATE, world=2, recipe="tiny_moe_tool")
    a, b = metrics(tmp_path / "colocated"), metrics(tmp_path / "separate")
    for x, y in zip(a, b):
        assert x["env/turns_mean"] >= 1.0 and x["env/failed_frac"] == 0.0
        for key in ("reward/mean", "env/turns_mean", "env/tool_calls_mean", "env/env_token_share"):
            assert x[key] == y[key], key
        assert abs(x["train/loss"] - y["train/loss"]) <= 1e-5


@pytest.fixture(scope="module")
def one_off(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_off") / "straight"
    _run(out, 4, *ONE_OFF, world=3)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({row["step"] for row in samples}) == [1, 2, 3, 4]
    return metrics(out)


def test_one_step_off_trains_on_the_previous_policys_rollouts(one_off):
    assert [row["async/staleness/max"] for row in one_off] == [0.0, 1.0, 1.0, 1.0]
    # version 3 is sampled by no step of 4: streamed after step 3 for its validation alone
    assert [row.get("val/version") for row in one_off] == [None, None, 3.0, None]
    assert one_off[2]["val/response_length_mean"] > 0
    assert one_off[0]["mismatch/mean"] < 1e-4     # step 1: the initial weights on both sides
    assert all(row["mismatch/mean"] > 1e-3 for row in one_off[1:])   # stale, and measured
    assert all(0.0 <= row["train/tis_capped_frac"] <= 1.0 for row in one_off)
    assert sum(row["rollout/groups_drawn"] for row in one_off) > 4 * 4   # refills happened
    # versions 0 (at the start), 1 and 2 are streamed; no later step is sampled by version 3
    model_mb = one_off[0]["async/weight_transfer_MB"]
    assert model_mb > 0.5 and [row.get("async/weight_transfer_MB") for row in one_off] == \
        [model_mb, model_mb, model_mb, None]


def test_a_kill_during_generation_resumes_bit_identically(tmp_path, one_off):
    """generate:4 kills the engine as it starts step 4 (with version 2). The rerun of the same
    command resumes from step 2, with step 3's rollouts (generated by version 1) from the
    checkpoint. (A kill during a weight transfer, push:2:5, is the R3 test's below: same schedule,
    its routes kept in the checkpoint too.)"""
    out = tmp_path / "killed"
    killed = _run(out, 4, *ONE_OFF, world=3, kill_at="generate:4", ok=False)
    assert killed.returncode != 0
    r = _run(out, 4, *ONE_OFF, world=3)
    assert "resumed from step 2" in r.stderr
    assert metrics(out)[-4:] == one_off


def test_one_step_off_with_tensor_parallel_trainers(tmp_path):
    """World 3 with the two trainer ranks at TP 2: the weights streamed are the gathered shards."""
    r = _run(tmp_path / "tp2", 2, *ONE_OFF, "parallel.tensor_model_parallel_size=2", world=3)
    assert "world 2 (DP 1)" in r.stderr
    rows = metrics(tmp_path / "tp2")
    assert [row["async/staleness/max"] for row in rows] == [0.0, 1.0]
    assert rows[0]["mismatch/mean"] < 1e-4   # the engine got the whole model from the shards


def test_replayed_routes_travel_with_the_rollouts_as_colocated(tmp_path):
    """R3 under separate placement, synchronous: the engine rank's recorded expert routes reach
    the trainer inside the rollouts, and training on them equals the colocated run."""
    _run(tmp_path / "colocated", 2, recipe="tiny_moe_r3")
    _run(tmp_path / "separate", 2, *SEPARATE, world=2, recipe="tiny_moe_r3")
    a, b = metrics(tmp_path / "colocated"), metrics(tmp_path / "separate")
    for x, y in zip(a, b):
        assert y["r3/missing_frac"] == 0.0 and y["r3/route_agreement"] >= 0.999
        for key in ("reward/mean", "r3/route_agreement", "mismatch/mean"):
            assert x[key] == y[key], key
        assert abs(x["train/loss"] - y["train/loss"]) <= 1e-5


def test_replayed_routes_of_the_steps_in_flight_are_kept_in_the_checkpoint(tmp_path):
    """One step off with R3, killed as version 2 streams: the checkpoint after step 2 holds step
    3's rollouts and their routes (``in_flight_routes.npz``); the rerun resumes from it and equals
    the straight run, number for number."""
    one_off = [*SEPARATE, "rollout.max_staleness=1"]
    _run(tmp_path / "straight", 4, *one_off, world=2, recipe="tiny_moe_r3")
    killed = _run(tmp_path / "split", 4, *one_off, world=2, recipe="tiny_moe_r3",
                  kill_at="push:2:5", ok=False)
    assert killed.returncode != 0
    assert (tmp_path / "split" / "checkpoints" / "step_00000002" / "in_flight_routes.npz").is_file()
    r = _run(tmp_path / "split", 4, *one_off, world=2, recipe="tiny_moe_r3")
    assert "resumed from step 2" in r.stderr
    straight = metrics(tmp_path / "straight")
    assert metrics(tmp_path / "split") == straight
    assert [row["r3/missing_frac"] for row in straight] == [0.0] * 4
