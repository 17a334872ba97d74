"""Separate placement's load-time rules: keys that only mean something with engine ranks of
their own, splits that leave no engine or no trainer, and features that need the engine in the
trainer's process are refused in one line naming the key; a stale run without a correction warns;
and the in-flight rollouts a checkpoint keeps round-trip through JSON bit for bit."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from megatron_rl.config import ConfigError, load_config, validate_world
from megatron_rl.config.soundness import load_warnings

GSPO = pathlib.Path(__file__).resolve().parents[2] / "configs" / "recipes" / "tiny_moe_gspo.yaml"
SEP = ["rollout.placement=separate", "rollout.engine_ranks=1", "rollout.probe_every=0"]


@pytest.mark.parametrize("overrides,needle", [
    (["rollout.engine_ranks=1"], "rollout.engine_ranks: 1 needs rollout.placement=separate"),
    (["rollout.max_staleness=1"], "rollout.max_staleness: 1 needs rollout.placement=separate"),
    (["rollout.placement=separate", "rollout.probe_every=0"],
     "rollout.engine_ranks: placement=separate needs at least one engine rank"),
    ([*SEP, "rollout.engine_ranks=3", "rollout.tensor_parallel_size=2"],
     "rollout.engine_ranks: 3 is not a multiple of rollout.tensor_parallel_size=2"),
    (["rollout.placement=separate", "rollout.engine_ranks=1"], "rollout.probe_every: with "
     "rollout.placement=separate it compares the engine with the trainer's forward"),
    (["rollout.placement=apart"], "rollout.placement: must be one of colocated, separate"),
])
def test_placement_settings_that_cannot_work_are_refused_in_one_line(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(GSPO, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_split_is_checked_against_the_launched_world():
    cfg = load_config(GSPO, [*SEP, "train.prompts_per_step=4", "train.micro_batch_size=8"])
    assert validate_world(cfg, 3) == 2          # one engine rank, two trainer ranks at DP 2
    with pytest.raises(ConfigError, match="rollout.engine_ranks: 1 leaves no trainer rank in a "
                                          "world of 1"):
        validate_world(cfg, 1)
    with pytest.raises(ConfigError, match="train.prompts_per_step: 4 prompts must split evenly"):
        validate_world(load_config(GSPO, [*SEP, "train.prompts_per_step=4", "train.micro_batch_size=8",
                                          "rollout.engine_ranks=2"]), 5)   # DP 3


def test_staleness_without_a_correction_warns_naming_the_key():
    stale = load_warnings(load_config(GSPO, [*SEP, "rollout.max_staleness=1"]))
    assert any("rollout.max_staleness=1" in w and "set algo.mismatch.tis_cap" in w for w in stale)
    fixed = load_warnings(load_config(GSPO, [*SEP, "rollout.max_staleness=1",
                                              "algo.mismatch.tis_cap=2.0"]))
    assert not any("max_staleness" in w for w in fixed)
    assert not any("max_staleness" in w for w in load_warnings(load_config(GSPO, SEP)))


def test_in_flight_rollouts_round_trip_through_json_bit_for_bit():
    from megatron_rl.data.prompts import PromptRow
    from megatron_rl.rollout.collect import Rollouts
    from megatron_rl.rollout.engine import Sample
    from megatron_rl.rollout.rollout_state import json_default, rollouts_from_state, rollouts_state

    g = torch.Generator().manual_seed(0)
    lp = torch.randn(5, generator=g, dtype=torch.float32).tolist()
    r = Rollouts(rows=[PromptRow(3, [{"role": "user", "content": "2+2"}], label="4",
                                 metadata={"n": torch.tensor(2)})],
                 samples=[[Sample(3, [1, 2], [5, 6, 7, 8, 9], lp, "stop", action_mask=[1] * 5,
                                  info={"turns": 1})]],
                 rewards=[torch.tensor([1 / 3], dtype=torch.float32)], all_rewards=[1 / 3],
                 all_lengths=[5], groups_drawn=1, rounds=1, components={"format": 0.5})
    back = rollouts_from_state(json.loads(json.dumps(rollouts_state(r), default=json_default)))
    assert back.samples == r.samples and back.all_rewards == r.all_rewards
    assert back.rewards[0].dtype == torch.float32 and torch.equal(back.rewards[0], r.rewards[0])
    assert back.rows[0].prompt == r.rows[0].prompt and back.rows[0].metadata == {"n": 2}
    assert back.metrics() == r.metrics()


def test_in_flight_expert_routes_round_trip_through_the_checkpoints_npz(tmp_path):
    """R3 routes leave the JSON as keys; the arrays go through ``in_flight_routes.npz`` bit for
    bit, and a state whose routes are gone fails naming the missing key."""
    import numpy as np

    from megatron_rl.data.prompts import PromptRow
    from megatron_rl.rollout.collect import Rollouts
    from megatron_rl.rollout.engine import Sample
    from megatron_rl.rollout.rollout_state import (load_routes, rollouts_from_state,
                                                   rollouts_state, save_routes)

    rng = np.random.default_rng(0)
    routes = [rng.integers(0, 8, size=(6, 2, 2)).astype(np.int16) for _ in range(2)]
    samples = [[Sample(0, [1, 2], [5, 6, 7, 8], [-0.5] * 4, "stop", routed_experts=x)
                for x in routes]]
    r = Rollouts(rows=[PromptRow(0, "p")], samples=samples, rewards=[torch.zeros(2)],
                 all_rewards=[0.0, 0.0], all_lengths=[4, 4], groups_drawn=1, rounds=1)
    held: dict = {}
    state = json.loads(json.dumps(rollouts_state(r, held, prefix="s3_")))
    assert sorted(held) == ["s3_0_0", "s3_0_1"]
    save_routes(tmp_path / "r.npz", held)
    back = rollouts_from_state(state, load_routes(tmp_path / "r.npz"))
    for s, want in zip(back.samples[0], routes):
        assert s.routed_experts.dtype == np.int16 and np.array_equal(s.routed_experts, want)
    with pytest.raises(ValueError, match="s3_0_0"):
        rollouts_from_state(state, {})
