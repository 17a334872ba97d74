import pathlib
import re

import pytest

from megatron_rl.cli import main
from megatron_rl.config import ConfigError, load_config, validate_world

RECIPES = pathlib.Path(__file__).resolve().parents[2] / "configs" / "recipes"


def test_defaults_chain_merges_parents_first_and_overrides_last():
    cfg = load_config(RECIPES / "tiny_moe_future_kl_grpo.yaml",
                      ["train.steps=7", "algo.loss.params.weight_params.eps_high=0.5"])
    assert cfg.algo.loss.name == "future_kl_grpo"          # base.yaml's gspo, replaced by the leaf
    assert cfg.train.lr == 1.0e-3                          # base.yaml's 1e-6, replaced by tiny_moe_base
    assert cfg.rollout.max_response_len == 5               # from tiny_moe_base.yaml
    assert cfg.train.updates_per_step == 2                 # from tiny_moe_future_kl_grpo.yaml
    assert cfg.train.steps == 7 and cfg.algo.loss.params["weight_params"]["eps_high"] == 0.5


@pytest.mark.parametrize("override,needle", [
    ("train.lrr=1", "unknown key train.lrr (did you mean 'lr'?)"),
    ("trian.lr=1", "unknown key trian"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=0", "train.steps: must be >= 1"),
    ("rollout.top_p=1.5", "rollout.top_p: must be <= 1"),
    ("rollout.n_samples_per_prompt=1", "rollout.n_samples_per_prompt"),
    ("algo.advantage.name=grpoo", "algo.advantage.name: unknown advantage estimator 'grpoo'"),
    ("algo.loss.params.eps_hgh=0.1", "algo.loss.params: policy loss 'gspo' has no parameter 'eps_hgh'"),
    ("algo.advantage.params.betta=1", "algo.advantage.params"),
    ("algo.kl_estimator=k5", "algo.kl_estimator: must be one of k1, k2, k3"),
    ("algo.loss.name=future_kl_grpo", "expects algo.advantage.name=future_kl_grpo"),
    ("train.updates_per_step=3", "train.updates_per_step"),
    ("no_equals_sign", "expected key=value"),
    ("algo.loss.params.agg=sum", "algo.loss.params: unknown loss aggregation 'sum'"),
    ("algo.loss.params.entropy_control=clipcov", "algo.loss.params: entropy_control must be one of none, clip_cov, kl_cov"),
    ("algo.loss.params.tis_mode=trunc", "algo.loss.params.tis_mode: the train/inference "
                                        "corrections are set under algo.mismatch"),
    ("algo.mismatch.icepop=[1.5,2.0]", "algo.mismatch.icepop: must be [low, high] with 0 <= low <= 1"),
    ("algo.mismatch.tis_level=seq", "algo.mismatch.tis_level: must be one of token, sequence"),
    ("algo.advantage.params.baseline=grp", "algo.advantage.params: advantage estimator 'grpo' has no"),
])
def test_bad_values_fail_at_load_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPES / "tiny_moe_gspo.yaml", [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_weight_params_are_checked_against_the_weight_function(tmp_path):
    with pytest.raises(ConfigError, match="weight_params: weight function 'ppo_clip' has no parameter 'q'"):
        load_config(RECIPES / "tiny_moe_future_kl_grpo.yaml", ["algo.loss.params.weight_params.q=1"])


def test_recipe_file_problems_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [b]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a]\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("train:\n  stesp: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key train.stesp \(did you mean 'steps'\?\)"):
        load_config(tmp_path / "typo.yaml")
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "missing.yaml")


def test_world_size_must_tile_the_parallel_layout():
    cfg = load_config(RECIPES / "tiny_moe_gspo.yaml", ["parallel.tensor_model_parallel_size=2",
                                                  "parallel.context_parallel_size=2"])
    assert validate_world(cfg, 8) == 2
    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        validate_world(cfg, 6)
    cfg = load_config(RECIPES / "tiny_moe_gspo.yaml", ["parallel.expert_model_parallel_size=4"])
    with pytest.raises(ConfigError, match="expert_model_parallel_size"):
        validate_world(cfg, 2)


def test_print_config_prints_the_resolved_recipe(capsys):
    assert main(["print-config", str(RECIPES / "tiny_moe_gspo.yaml"), "train.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "name: gspo" in out and "defaults" not in out


def test_cli_reports_a_typo_in_one_line_with_exit_code_2(capsys):
    assert main(["print-config", str(RECIPES / "tiny_moe_gspo.yaml"), "train.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.lrr" in err and "Traceback" not in err


def test_bad_parameter_values_fail_at_load_not_at_the_first_step():
    with pytest.raises(ConfigError, match="algo.loss.params: dual_clip must exceed"):
        load_config(RECIPES / "tiny_moe_gspo.yaml", ["algo.loss.name=grpo", "algo.loss.params={dual_clip: 1.1, eps_high: 0.2}"])
    with pytest.raises(ConfigError, match="algo.advantage.params: reinforce_pp baseline must be"):
        load_config(RECIPES / "tiny_moe_gspo.yaml", ["algo.advantage.name=reinforce_pp",
                                                "algo.advantage.params.baseline=grp"])


@pytest.mark.parametrize("overrides,needle", [
    (["algo.loss.params.entropy_control=clip_cov"], "algo.loss.params: entropy_control='clip_cov' needs"),
])
def test_methods_that_need_whole_sequences_fail_at_load_under_context_parallelism(overrides, needle):
    cp2 = ["parallel.context_parallel_size=2"]
    for ok in (overrides, cp2):  # each half alone is fine
        load_config(RECIPES / "tiny_moe_gspo.yaml", ok)
    with pytest.raises(ConfigError) as e:
        load_config(RECIPES / "tiny_moe_gspo.yaml", cp2 + overrides)
    assert needle in str(e.value) and "context_parallel_size" in str(e.value)


def test_suffix_sum_and_scan_estimators_are_accepted_under_context_parallelism():
    cp4 = ["parallel.context_parallel_size=4"]
    load_config(RECIPES / "tiny_moe_gspo.yaml", cp4 + ["algo.advantage.name=reinforce_pp"])
    load_config(RECIPES / "tiny_moe_future_kl_grpo.yaml", cp4 + ["algo.loss.params.ratio=future"])
    # discounted scans exchange per-chunk carries (CPSeqOps.linear_suffix_scan)
    load_config(RECIPES / "tiny_moe_gspo.yaml", cp4 + ["algo.advantage.name=reinforce_pp",
                                                  "algo.advantage.params.gamma=0.99"])
    load_config(RECIPES / "tiny_moe_ppo.yaml", cp4 + ["algo.advantage.params={gamma: 0.99, lam: 0.9}"])


@pytest.mark.parametrize("recipe,overrides,needle", [
    ("tiny_moe_ppo.yaml", ["train.steps=10", "critic.warmup_steps=10"],
     "critic.warmup_steps: 10 critic-only steps leave none"),
    ("tiny_moe_ppo.yaml", ["critic.loss_agg=sum"], "critic.loss_agg"),
    ("tiny_moe_ppo.yaml", ["critic.value_clip=-1"], "critic.value_clip"),
])
def test_ppo_configs_that_cannot_train_fail_at_load_naming_the_key(recipe, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(RECIPES / recipe, overrides)


@pytest.mark.parametrize("overrides,needle", [
    (['model.hf_config=""'], "model.hf_config: required (a Hugging Face model directory"),
    (["model.hf_config=tiny:nope"], "model.hf_config: unknown tiny model 'nope'"),
    (["model.hf_config=/no/such/dir"], "model.hf_config: /no/such/dir does not exist"),
    (["model.hf_config=tiny:qwen3_moe", "parallel.expert_model_parallel_size=3"],
     "parallel.expert_model_parallel_size=3 does not divide num_experts=4"),
    (["model.hf_config=tiny:qwen3_moe", "parallel.tensor_model_parallel_size=3"],
     "parallel.tensor_model_parallel_size=3 does not divide num_attention_heads=4"),
    (["model.attention_backend=flash"], "model.attention_backend: must be one of auto, sdpa, te"),
    (["model.hf_config=tiny:deepseek_v3", "model.attention_backend=sdpa",
      "parallel.tensor_model_parallel_size=2"], "with multi-latent attention (DeepSeek-V3) needs"),
])
def test_model_section_errors_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPES / "tiny_moe_gspo.yaml", overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_expert_tensor_parallel_defaults_to_tp_and_world_rules_name_the_fix():
    cfg = load_config(RECIPES / "tiny_moe_gspo.yaml", ["model.hf_config=tiny:qwen3_moe",
                                                  "parallel.tensor_model_parallel_size=2"])
    assert cfg.parallel.layout().expert_tp == 2
    assert validate_world(cfg, 4) == 2
    cfg.parallel.expert_tensor_parallel_size = 1
    with pytest.raises(ConfigError, match="expert_tensor_parallel_size=1 must equal"):
        validate_world(cfg, 4)


@pytest.mark.parametrize("overrides,needle", [
    (["rollout.ignore_eos=true", "algo.overlong.buffer_len=4"],
     "algo.overlong.buffer_len: rollout.ignore_eos makes every response"),
    (["rollout.max_response_len=40000"], "rollout.max_response_len: max_prompt_len + "
                                         "max_response_len = 40016 exceeds the model's "
                                         "max_position_embeddings=32768"),
    (["data.synthetic_answer_len=-1"], "data.synthetic_answer_len"),
])
def test_long_response_settings_that_cannot_work_fail_at_load(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPES / "tiny_moe_gspo.yaml", overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_child_recipe_gets_its_own_output_dir_not_its_parents(tmp_path):
    child = tmp_path / "my_run.yaml"
    child.write_text(f"defaults: [{RECIPES / 'tiny_moe_gspo.yaml'}]\ntrain: {{lr: 2.0e-3}}\n")
    assert load_config(child).train.output_dir == "runs/my_run"
    assert load_config(child, ["train.output_dir=/tmp/x"]).train.output_dir == "/tmp/x"
    assert load_config(RECIPES / "tiny_moe_gspo.yaml").train.output_dir == "runs/tiny_moe_gspo"
    own = tmp_path / "own.yaml"
    own.write_text(f"defaults: [{RECIPES / 'tiny_moe_gspo.yaml'}]\ntrain: {{output_dir: out/o}}\n")
    assert load_config(own).train.output_dir == "out/o"


def test_a_resume_refuses_changed_training_settings_and_allows_safe_knobs():
    from megatron_rl.config.drift import training_changes
    from megatron_rl.train.setup import config_tree, refuse_drift

    base = load_config(RECIPES / "tiny_moe_gspo.yaml")
    saved = config_tree(base)
    for safe in (["train.steps=900"], ["train.checkpoint_every=7", "rollout.probe_every=0"],
                 ["parallel.tensor_model_parallel_size=2"]):
        assert training_changes(saved, config_tree(load_config(RECIPES / "tiny_moe_gspo.yaml",
                                                                safe))) == []
    changed = load_config(RECIPES / "tiny_moe_gspo.yaml",
                          ["train.lr=3e-3", "algo.loss.params.eps_high=0.01"])
    got = training_changes(saved, config_tree(changed))
    assert got == ["algo.loss.params.eps_high: 0.004 -> 0.01", "train.lr: 0.001 -> 0.003"]
    with pytest.raises(ConfigError, match=r"train.resume: .*step_00000500 was trained with other "
                                          r"settings: algo.loss.params.eps_high.*train.resume=force"):
        refuse_drift(saved, changed, pathlib.Path("runs/x/checkpoints/step_00000500"))
    forced = load_config(RECIPES / "tiny_moe_gspo.yaml", ["train.lr=3e-3", "train.resume=force"])
    refuse_drift(saved, forced, pathlib.Path("x"))      # the user said so
    refuse_drift(None, changed, pathlib.Path("x"))      # a checkpoint from before saved configs
    assert load_config(RECIPES / "tiny_moe_gspo.yaml", ["train.resume=false"]).train.resume == "false"


def test_a_checkpoint_of_an_earlier_version_resumes_across_added_and_retired_keys():
    """Keys added since (train.routing_replay, algo.mismatch.*, rollout.return_routes) at their
    defaults keep the old behaviour, and model.routing_replay: false was the default: no change.
    A run that had replay on (model.routing_replay: true) is told what changed."""
    from megatron_rl.train.setup import config_tree, refuse_drift

    now = load_config(RECIPES / "tiny_moe_gspo.yaml")
    old = config_tree(now)
    for key in ("routing_replay", "return_routes"):
        old["train"].pop(key, None)
        old["rollout"].pop(key, None)
    old["algo"].pop("mismatch")
    old["model"]["routing_replay"] = False
    refuse_drift(old, now, pathlib.Path("x"))
    old["model"]["routing_replay"] = True
    with pytest.raises(ConfigError, match="model.routing_replay: True -> '<unset>'"):
        refuse_drift(old, now, pathlib.Path("x"))
    with pytest.raises(ConfigError, match="train.routing_replay: '<unset>' -> 'rollout'"):
        refuse_drift(config_tree(now) | {"train": {k: v for k, v in config_tree(now)["train"].items()
                                                   if k != "routing_replay"}},
                     load_config(RECIPES / "tiny_moe_gspo.yaml", ["train.routing_replay=rollout"]),
                     pathlib.Path("x"))


def test_known_late_failures_are_refused_at_start_up():
    from megatron_rl.config.run import check_cpu_engines

    recipe = RECIPES / "tiny_moe_gspo.yaml"
    with pytest.raises(ConfigError, match=r"train.micro_batch_size: 12 is not a multiple of "
                                          r"rollout.n_samples_per_prompt=8"):
        load_config(recipe, ["train.micro_batch_size=12"])
    cfg = load_config(recipe)
    # launch/torchrun.sh's own example once ended in a 490-line vLLM all_gatherv error
    with pytest.raises(ConfigError, match=r"rollout.tensor_parallel_size: 1 with 2 processes makes "
                                          r"2 vLLM engines .* set rollout.tensor_parallel_size=2"):
        check_cpu_engines(cfg, 2, moe=True)
    check_cpu_engines(cfg, 2, moe=False)                   # dense models run side by side
    check_cpu_engines(load_config(recipe, ["rollout.tensor_parallel_size=2"]), 2, moe=True)


@pytest.mark.parametrize("override,needle", [
    ("algo.loss.params.eps_low=abc", "parameter 'eps_low' is 'abc' (str); it takes a number"),
    ("algo.advantage.params.whiten=3", "parameter 'whiten' is 3 (int); it takes a bool"),
    ("algo.loss.params.agg=1", "parameter 'agg' is 1 (int); it takes a string"),
])
def test_a_wrong_type_inside_algo_params_names_the_parameter(override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(RECIPES / "tiny_moe_gspo.yaml", [override])


def test_a_user_recipe_anywhere_inherits_a_shipped_recipe_by_name(tmp_path):
    (tmp_path / "mine.yaml").write_text("defaults: [tiny_moe_gspo]\ntrain:\n  lr: 2.0e-3\n")
    cfg = load_config(tmp_path / "mine.yaml")
    assert (cfg.train.lr, cfg.algo.loss.name, cfg.train.output_dir) == (2e-3, "gspo", "runs/mine")
    # a file of that name beside the recipe wins over the shipped one
    (tmp_path / "tiny_moe_gspo.yaml").write_text("defaults: [tiny_moe_ppo]\n")
    assert load_config(tmp_path / "mine.yaml").algo.advantage.name == "gae"


def test_the_wheel_ships_every_recipe(tmp_path):
    """A pip-installed megatron-rl resolves recipes by name: they are package data."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = RECIPES.parents[1]
    src = tmp_path / "src"
    shutil.copytree(root / "megatron_rl", src / "megatron_rl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(root / f, src / f)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("megatron_rl-*.whl")
    shipped = {n.split("/")[-1] for n in zipfile.ZipFile(wheel).namelist()
               if n.startswith("megatron_rl/recipes/")}
    assert shipped == {p.name for p in RECIPES.glob("*.yaml")} and "tiny_moe_gspo.yaml" in shipped


@pytest.mark.parametrize("override,needle", [
    ("train.tensorboard=false", "train.tensorboard is gone: use train.loggers"),
    ("train.trackers=[wandb]", "train.trackers is gone: use train.loggers"),
    ("model.kind=mcore", "model.kind is gone"),
    ("train.loggers=[tensorboard,wandbb]", "train.loggers: unknown 'wandbb'; known: tensorboard, wandb, mlflow"),
])
def test_retired_keys_and_unknown_loggers_name_the_replacement(override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(RECIPES / "tiny_moe_gspo.yaml", [override])


def test_every_key_resume_may_change_exists():
    """A renamed key left in drift.SAFE would make its successor a refused change."""
    from megatron_rl.config.doc import render
    from megatron_rl.config.drift import SAFE

    keys = re.findall(r"^\| `([^`]+)`", render(), re.M)
    stale = [s for s in SAFE if not any(k == s or (s.endswith(".") and k.startswith(s)) for k in keys)]
    assert not stale, stale
