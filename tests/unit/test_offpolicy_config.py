"""Issue 33's load-time rules: routing replay and the mismatch corrections are configured in one
place each and refused where they cannot work; off-policy settings without their correction
warn naming the key that fixes them; the shipped GPU recipes use the corrected forms."""

from __future__ import annotations

import pathlib

import pytest

from megatron_rl.config import ConfigError, load_config
from megatron_rl.config.soundness import load_warnings

RECIPES = pathlib.Path(__file__).resolve().parents[2] / "configs" / "recipes"
GSPO = RECIPES / "tiny_moe_gspo.yaml"


@pytest.mark.parametrize("overrides,needle", [
    (["algo.advantage.name=reinforce_pp", "algo.advantage.params={baseline: group}",
      "rollout.n_samples_per_prompt=1", "train.micro_batch_size=16"],
     "algo.advantage.params.baseline: group subtracts the mean reward"),
    (["model.hf_config=tiny:qwen3", "train.routing_replay=rollout"],
     "train.routing_replay: rollout replays expert routes, and the model has no experts"),
    (["model.hf_config=tiny:qwen3", "rollout.return_routes=true"],
     "rollout.return_routes: the model has no experts"),
    (["algo.mismatch.behaviour=rollout", "algo.mismatch.tis_cap=2.0"],
     "algo.mismatch.behaviour=rollout trains against the engine's log-probs"),
    (["algo.loss.params.tis_cap=2.0"], "algo.loss.params.tis_cap: the train/inference corrections "
                                        "are set under algo.mismatch"),
    (["algo.mismatch.mis=[0.5]"], "algo.mismatch.mis: must be [low, high]"),
    (["train.routing_replay=always"], "train.routing_replay: must be one of off, old, rollout"),
])
def test_what_cannot_train_correctly_is_refused_in_one_line(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(GSPO, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def _leaf(tmp_path, body: str) -> pathlib.Path:
    """A user recipe on the tiny MoE's base (whose loss has no parameters to merge with)."""
    path = tmp_path / "leaf.yaml"
    path.write_text(f"defaults: [{RECIPES / 'tiny_moe_base.yaml'}]\n{body}")
    return path


def test_reinforce_pp_with_a_group_baseline_and_groups_loads(tmp_path):
    leaf = _leaf(tmp_path, "algo:\n  advantage: {name: reinforce_pp, params: {baseline: group}}\n"
                           "  loss: {name: reinforce, params: {weight: ppo_clip}}\n")
    assert load_config(leaf).rollout.n_samples_per_prompt == 8


@pytest.mark.parametrize("overrides,key", [
    (["train.updates_per_step=2", "algo.loss.params.kl_coef=0.01", "algo.advantage.name=rloo"],
     "algo.loss.params.kl_placement=surrogate"),
    (["train.updates_per_step=2"], "train.routing_replay=rollout"),
])
def test_off_policy_without_its_correction_warns_naming_the_fix(overrides, key):
    warned = load_warnings(load_config(GSPO, overrides))
    assert any(key in w for w in warned), warned


def test_off_policy_reinforce_without_importance_weights_warns(tmp_path):
    leaf = _leaf(tmp_path, "algo:\n  loss: {name: reinforce, params: {}}\ntrain:\n"
                           "  epochs_per_step: 2\n  routing_replay: rollout\n")
    warned = load_warnings(load_config(leaf))
    assert len(warned) == 1 and "algo.loss.params.weight=ppo_clip" in warned[0]


def test_on_policy_or_corrected_settings_do_not_warn():
    assert load_warnings(load_config(GSPO)) == []
    corrected = ["train.updates_per_step=2", "algo.loss.params.kl_coef=0.01",
                 "algo.loss.params.kl_placement=surrogate", "train.routing_replay=rollout"]
    assert load_warnings(load_config(GSPO, corrected)) == []


def test_every_shipped_recipe_loads_without_an_off_policy_warning(monkeypatch):
    from tests.unit.test_recipes import RECIPES as ALL, _overrides
    import megatron_rl.model.build as build

    monkeypatch.setattr(build, "have_transformer_engine", lambda: True)  # as in the GPU image
    for recipe in ALL:
        assert load_warnings(load_config(recipe, _overrides(recipe))) == [], recipe.name


@pytest.mark.parametrize("recipe", ["qwen3_30b_a3b_8xh100", "deepseek_v3_256xh100",
                                    "tiny_moe_future_kl_grpo", "tiny_moe_r3"])
def test_shipped_off_policy_moe_recipes_replay_the_engines_routes(recipe):
    from tests.unit.test_recipes import _overrides

    path = RECIPES / f"{recipe}.yaml"
    import megatron_rl.model.build as build

    build_te, build.have_transformer_engine = build.have_transformer_engine, lambda: True
    try:
        cfg = load_config(path, _overrides(path))
    finally:
        build.have_transformer_engine = build_te
    assert cfg.train.routing_replay == "rollout" and cfg.train.updates_per_step > 1


def test_mismatch_settings_reach_the_loss_as_its_parameters():
    cfg = load_config(GSPO, ["algo.mismatch.tis_cap=2.0", "algo.mismatch.icepop=[0.5,2.0]",
                             "algo.mismatch.mis=[0.6,1.5]", "algo.mismatch.tr_max_kl=0.3"])
    assert cfg.algo.loss_params() == {"eps_low": 3e-3, "eps_high": 4e-3, "tis_cap": 2.0,
                                      "tis_level": "token", "icepop": (0.5, 2.0),
                                      "mis": (0.6, 1.5), "tr_max_kl": 0.3}
