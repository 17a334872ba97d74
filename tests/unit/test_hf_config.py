"""HF config.json -> Megatron TransformerConfig arguments, and the errors bad configs get."""

import json

import pytest

from megatron_rl.model.build import ModelOptions, transformer_config
from megatron_rl.parallel.config import Layout
from megatron_rl.model.hf_config import load_hf_config
from megatron_rl.model.tiny import TINY, tiny_hf_config


def test_qwen3_moe_maps_shape_router_and_qk_norm():
    hf = load_hf_config(tiny_hf_config("qwen3_moe"))
    c = hf.config
    assert (c["num_layers"], c["hidden_size"], c["num_attention_heads"], c["num_query_groups"],
            c["kv_channels"]) == (2, 64, 4, 2, 32)
    assert (c["num_moe_experts"], c["moe_router_topk"], c["moe_ffn_hidden_size"]) == (4, 2, 64)
    assert c["qk_layernorm"] and not c["moe_router_pre_softmax"] and not c["add_qkv_bias"]
    assert c["moe_layer_freq"] == 1 and hf.vocab_size == 256 and hf.rotary_base == 10000.0


def test_norm_topk_prob_false_means_softmax_before_topk():
    hf = load_hf_config(tiny_hf_config("qwen3_moe", norm_topk_prob=False))
    assert hf.config["moe_router_pre_softmax"]


def test_mlp_only_layers_become_dense_layers():
    hf = load_hf_config(tiny_hf_config("qwen3_moe", num_hidden_layers=4, mlp_only_layers=[0, 3]))
    assert hf.config["moe_layer_freq"] == [0, 1, 1, 0]


def test_qwen2_has_qkv_bias_and_no_qk_norm():
    c = load_hf_config(tiny_hf_config("qwen2")).config
    assert c["add_qkv_bias"] and not c.get("qk_layernorm", False)


def test_transformers_5_rope_parameters_are_read():
    hf = load_hf_config(tiny_hf_config("qwen3", rope_parameters={"rope_type": "default",
                                                                   "rope_theta": 1e6}))
    assert hf.rotary_base == 1e6


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_tiny_model_gives_a_valid_transformer_config(name):
    hf = load_hf_config(tiny_hf_config(name))
    cfg = transformer_config(hf, Layout(), ModelOptions())
    assert cfg.num_layers == 2 and cfg.num_query_groups == (4 if name == "deepseek_v3" else 2)
    if hf.num_experts:  # RL default: no load-balancing loss
        assert cfg.moe_aux_loss_coeff == 0.0 and cfg.moe_router_load_balancing_type == "none"


def test_config_json_from_a_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config("mixtral")))
    assert load_hf_config(tmp_path).architecture == "MixtralForCausalLM"


@pytest.mark.parametrize("mutate,needle", [
    (dict(architectures=["GPT2LMHeadModel"]), "architecture 'GPT2LMHeadModel' is not supported; supported:"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0}), "rope_type='dynamic'"),
    (dict(use_sliding_window=True, sliding_window=64), "sliding-window attention"),
    (dict(quantization_config={"quant_method": "fp8"}), "dequantize"),
])
def test_unsupported_configs_fail_naming_the_field(mutate, needle):
    with pytest.raises(ValueError, match="model.hf_config: ") as e:
        load_hf_config(tiny_hf_config("qwen3_moe", **mutate))
    assert needle in str(e.value)


def test_missing_field_is_named():
    hf = tiny_hf_config("qwen3_moe")
    del hf["num_experts"]
    with pytest.raises(ValueError, match="config.json has no 'num_experts'"):
        load_hf_config(hf)


def test_missing_file_and_bad_json_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_hf_config(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_hf_config(tmp_path)


@pytest.mark.parametrize("layout,needle", [
    (Layout(ep=3), "parallel.expert_model_parallel_size=3 does not divide num_experts=4"),
    (Layout(tp=8), "parallel.tensor_model_parallel_size=8 does not divide num_attention_heads=4"),
    (Layout(tp=4), "does not divide num_key_value_heads=2"),
    (Layout(pp=3), "parallel.pipeline_model_parallel_size=3 does not divide num_hidden_layers=2"),
])
def test_impossible_layouts_fail_naming_both_sides(layout, needle):
    with pytest.raises(ValueError, match="choose a divisor") as e:
        transformer_config(load_hf_config(tiny_hf_config("qwen3_moe")), layout, ModelOptions())
    assert needle in str(e.value)



def test_deepseek_v3_maps_mla_shared_experts_and_sigmoid_router():
    c = load_hf_config(tiny_hf_config("deepseek_v3")).config
    assert c["multi_latent_attention"] and c["qk_layernorm"]
    assert (c["q_lora_rank"], c["kv_lora_rank"], c["qk_head_dim"], c["qk_pos_emb_head_dim"],
            c["v_head_dim"]) == (32, 32, 16, 16, 16)
    assert c["moe_shared_expert_intermediate_size"] == 32 and c["moe_layer_freq"] == [0, 1]
    assert c["moe_router_score_function"] == "sigmoid" and c["moe_router_enable_expert_bias"]
    assert c["moe_router_topk_scaling_factor"] == 2.5


def test_deepseek_v3_yarn_rope_is_read_and_v2_routers_refused():
    yarn = {"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    c = load_hf_config(tiny_hf_config("deepseek_v3", rope_scaling=yarn)).config
    assert c["rope_type"] == "yarn" and c["rotary_scaling_factor"] == 40.0
    with pytest.raises(ValueError, match="topk_method=.greedy. is not supported: .* noaux_tc"):
        load_hf_config(tiny_hf_config("deepseek_v3", scoring_func="softmax", topk_method="greedy"))


def test_multi_latent_attention_with_tp_needs_transformer_engine():
    hf = load_hf_config(tiny_hf_config("deepseek_v3"))
    with pytest.raises(ValueError, match="multi-latent attention .* needs TransformerEngine"):
        transformer_config(hf, Layout(tp=2), ModelOptions(attention_backend="sdpa"))


# ----------------------------------------------------------------------------- key accounting

from megatron_rl.model.hf_arch import ARCHITECTURES, COMMON_IRRELEVANT, COMMON_MAPPED  # noqa: E402


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_key_transformers_defines_is_mapped_or_listed_irrelevant(arch):
    """A transformers upgrade that adds a config key fails here until the key is classified."""
    from transformers import CONFIG_MAPPING

    spec = ARCHITECTURES[arch]
    keys = set(CONFIG_MAPPING[spec.model_type]().to_dict())
    known = COMMON_MAPPED | spec.mapped | set(COMMON_IRRELEVANT) | set(spec.irrelevant)
    assert keys - known == set()
    assert not (spec.mapped & set(spec.irrelevant))


def test_unknown_key_is_refused_naming_it_and_ignored_on_request():
    cfg = tiny_hf_config("qwen3_moe", shared_expert_intermediate_size=64)
    with pytest.raises(ValueError, match=r"shared_expert_intermediate_size=64 .*"
                                         r"--allow-unknown-config-keys"):
        load_hf_config(cfg)
    hf = load_hf_config(cfg, allow_unknown_keys=True)
    assert hf.ignored == (("shared_expert_intermediate_size", 64),)


def test_a_key_at_transformers_default_is_accepted_unread():
    # DeepseekV3Config defines pretraining_tp=1; Mixtral's sliding_window=None
    assert not load_hf_config(tiny_hf_config("mixtral", sliding_window=None)).ignored
    assert load_hf_config(tiny_hf_config("deepseek_v3", pretraining_tp=1)).architecture


def test_absent_keys_take_transformers_defaults_not_ours():
    """transformers' Qwen3-MoE default is norm_topk_prob=False (softmax weights kept)."""
    cfg = tiny_hf_config("qwen3_moe")
    del cfg["norm_topk_prob"]
    assert load_hf_config(cfg).config["moe_router_pre_softmax"]


def _yarn(theta=None, **kw):
    out = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, **kw}
    return dict(out, rope_theta=theta) if theta else out


@pytest.mark.parametrize("keys", [
    dict(rope_scaling=_yarn(), rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
    dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}, rope_theta=1e6),
    dict(rope_scaling=_yarn(theta=3e5), rope_theta=1e6),
    dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=2e4),
    dict(rope_scaling=_yarn(), rope_parameters=_yarn(factor=8.0)),
    dict(rope_theta=7e4),
])
@pytest.mark.parametrize("name", ["qwen3", "deepseek_v3"])
def test_rope_precedence_is_transformers_precedence(name, keys):
    """rope_scaling vs rope_parameters vs rope_theta: what transformers itself resolves."""
    from transformers import CONFIG_MAPPING

    cfg = tiny_hf_config(name, **keys)
    theirs = CONFIG_MAPPING[cfg["model_type"]](**{k: v for k, v in cfg.items()
                                                   if k != "model_type"}).rope_parameters
    kind = theirs["rope_type"]
    if name == "deepseek_v3" and kind == "linear":
        with pytest.raises(ValueError, match="rope_type='linear'"):
            load_hf_config(cfg)
        return
    hf = load_hf_config(cfg)
    assert hf.rotary_base == theirs["rope_theta"]
    if name == "qwen3":
        rotary = dict(hf.rotary)
        assert rotary["position_embedding_type"] == ("yarn" if kind == "yarn" else "rope")
        assert rotary.get("seq_len_interpolation_factor") == (2.0 if kind == "linear" else None)
        if kind == "yarn":
            assert dict(hf.yarn)["yarn_rotary_scaling_factor"] == theirs["factor"]
    elif kind == "yarn":
        assert hf.config["rope_type"] == "yarn"
        assert hf.config["rotary_scaling_factor"] == theirs["factor"]
    else:
        assert hf.config["rope_type"] == "rope"


def test_both_expert_count_spellings_follow_transformers():
    from transformers import CONFIG_MAPPING

    cfg = tiny_hf_config("qwen3_moe", num_experts=4, num_local_experts=8)
    theirs = CONFIG_MAPPING["qwen3_moe"](**{k: v for k, v in cfg.items() if k != "model_type"})
    assert load_hf_config(cfg).num_experts == theirs.num_experts == 8


def test_a_config_transformers_rejects_is_one_line():
    with pytest.raises(ValueError, match="transformers' Qwen3Config rejects this config.json") as e:
        load_hf_config(tiny_hf_config("qwen3", num_attention_heads="four"))
    assert "\n" not in str(e.value) and "num_attention_heads" in str(e.value)


def test_group_limited_routing_scores_groups_by_their_top_two():
    """transformers' rule, not megatron-core's top (topk // topk_group)."""
    import torch

    from megatron_rl.model.router import group_limited_topk_top2

    scores = torch.tensor([[0.9, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.0]])  # groups of 4
    # top-2 sums: group 0 = 0.9, group 1 = 1.0 -> group 1; top-3 sums would pick group 1 too,
    # top-1 would pick group 0
    _, idx = group_limited_topk_top2(scores, 3, 1, 8, 2, 1)
    assert sorted(idx[0].tolist()) == [4, 5, 6]
    scores = torch.tensor([[0.9, 0.3, 0.05, 0.0, 0.45, 0.45, 0.45, 0.0]])
    # top-2 sums: 1.2 > 0.9 -> group 0; megatron-core's top-3 (3 // 1) sums: 1.25 < 1.35 -> group 1
    _, idx = group_limited_topk_top2(scores, 3, 1, 8, 2, 1)
    assert sorted(idx[0].tolist()) == [0, 1, 2]
