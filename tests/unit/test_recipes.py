"""Every shipped recipe loads and validates at the world size it is written for, on this
machine (no GPU): GPU recipes are checked as the GPU image would run them (TransformerEngine
present), with the shipped model configs standing in for the user's checkpoint."""

from __future__ import annotations

import pathlib
import re

import pytest

from megatron_rl.config import ConfigError, load_config, validate_world

RECIPES = sorted(pathlib.Path(__file__).resolve().parents[2].joinpath("configs", "recipes").glob("*.yaml"))
MODELS = pathlib.Path(__file__).resolve().parents[2] / "configs" / "models"
# what a user passes for the `???` fields of the GPU recipes
STAND_INS = {"qwen3": MODELS / "qwen3_30b_a3b", "deepseek": MODELS / "deepseek_v3"}


def _world(recipe: pathlib.Path) -> int:
    m = re.search(r"^# world size: (\d+)", recipe.read_text(), re.M)
    return int(m[1]) if m else 1


def _overrides(recipe: pathlib.Path):
    if recipe.name == "base.yaml":   # every recipe's root: sets no model
        return ["model.hf_config=tiny:qwen3_moe"]
    if not recipe.name.startswith(("qwen3", "deepseek", "gpu_base")):
        return []
    model = next((v for k, v in STAND_INS.items() if recipe.name.startswith(k)), STAND_INS["qwen3"])
    return [f"model.hf_config={model}", "data.path=prompts.jsonl"]


def test_recipes_exist_for_cpu_and_gpu_layouts():
    names = {r.stem for r in RECIPES}
    assert {"tiny_moe_gspo", "tiny_moe_future_kl_grpo", "qwen3_30b_a3b_8xh100",
            "qwen3_30b_a3b_32xh100", "deepseek_v3_256xh100"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_validates_at_its_world_size(recipe, monkeypatch):
    import megatron_rl.model.build as build

    monkeypatch.setattr(build, "have_transformer_engine", lambda: True)  # as in the GPU image
    cfg = load_config(recipe, _overrides(recipe))
    dp = validate_world(cfg, _world(recipe))
    assert dp >= 1


def test_gpu_recipes_demand_the_users_model_and_data():
    recipe = MODELS.parent / "recipes" / "qwen3_30b_a3b_8xh100.yaml"
    with pytest.raises(ConfigError, match=r"^data.path: required"):
        load_config(recipe)
    with pytest.raises(ConfigError, match=r"^model.hf_config: required"):
        load_config(recipe, ["data.path=prompts.jsonl"])


def test_a_layout_that_does_not_tile_the_world_is_rejected_at_validation():
    cfg = load_config(MODELS.parent / "recipes" / "qwen3_30b_a3b_32xh100.yaml",
                      [f"model.hf_config={STAND_INS['qwen3']}", "data.path=x.jsonl",
                       "model.attention_backend=sdpa", "model.grouped_gemm=false"])
    with pytest.raises(ConfigError, match="not divisible"):
        validate_world(cfg, 12)
    with pytest.raises(ConfigError, match="train.prompts_per_step"):
        validate_world(cfg, 48)   # 48 / (4 x 2) = DP 6 does not split 256 prompts x 4 updates
