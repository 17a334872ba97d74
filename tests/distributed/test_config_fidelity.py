"""An import reproduces transformers for every config.json key, or refuses naming the key.

For each architecture, every key its mapping reads is flipped away from the tiny model's value
one at a time: transformers writes a random model of the variant (its config.json rewritten with
every key transformers' config class defines), ``convert import`` imports it,
and the Megatron logits must equal transformers' (1e-4, fp32) or the import must refuse in one
line naming the flipped key. Keys declared irrelevant are flipped too, and must not change the
logits. This is the guard for the whole class of "imports fine, silently wrong" bugs: a key the
mapping ignores but transformers honours fails here.
"""

import pytest

from megatron_rl.model.hf_arch import ARCHITECTURES, COMMON_MAPPED
from megatron_rl.model.tiny import TINY
from tests.distributed.harness import spawn

TOL = 1e-4
TINY_OF = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
           "Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral",
           "DeepseekV3ForCausalLM": "deepseek_v3"}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
        "rope_theta": 100.0}
# key -> flipped value, or a dict of overrides whose first key is the flipped one
COMMON_FLIPS = {
    "vocab_size": 300, "hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 8,
    "num_key_value_heads": 4, "intermediate_size": 96, "rms_norm_eps": 1e-3, "hidden_act": "gelu",
    "attention_dropout": 0.1, "max_position_embeddings": 48, "tie_word_embeddings": True,
    "rope_theta": 100.0, "rope_parameters": YARN,
    "rope_scaling": {"rope_type": "linear", "factor": 3.0},
    "partial_rotary_factor": 0.5, "quantization_config": {"quant_method": "fp8"},
    "pretraining_tp": 2,
}
QWEN_ATTN_FLIPS = {"head_dim": 16, "sliding_window": 8, "use_sliding_window": True,
                   "max_window_layers": 0,
                   "layer_types": ["full_attention", "sliding_attention"]}
ARCH_FLIPS = {
    "Qwen2ForCausalLM": dict(QWEN_ATTN_FLIPS),
    "Qwen3ForCausalLM": dict(QWEN_ATTN_FLIPS, attention_bias=True),
    "Qwen3MoeForCausalLM": dict(
        QWEN_ATTN_FLIPS, attention_bias=True, num_experts=8, num_local_experts=8,
        num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=False,
        decoder_sparse_step=2, mlp_only_layers=[1]),
    "MixtralForCausalLM": dict(head_dim=16, sliding_window=8, num_local_experts=8, num_experts=8,
                               num_experts_per_tok=1),
    "DeepseekV3ForCausalLM": dict(
        num_attention_heads={"num_attention_heads": 8, "num_key_value_heads": 8},
        num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim={"qk_rope_head_dim": 8, "head_dim": 8}, head_dim=8, v_head_dim=8, n_routed_experts=8, num_local_experts=8,
        n_shared_experts=2, num_experts_per_tok=3, moe_intermediate_size=16,
        first_k_dense_replace=0, n_group=2, topk_group=2, routed_scaling_factor=1.0,
        norm_topk_prob=False, rope_interleave=False, attention_bias=True,
        scoring_func="softmax", topk_method="greedy", moe_layer_freq=2),
}
IRRELEVANT_FLIPS = {  # must leave the logits unchanged
    "Qwen2ForCausalLM": dict(attention_bias=False, initializer_range=0.3, use_cache=False,
                             bos_token_id=7, pad_token_id=3),
    "Qwen3MoeForCausalLM": dict(max_window_layers=0, router_aux_loss_coef=0.5,
                                output_router_logits=True),
    "MixtralForCausalLM": dict(router_jitter_noise=0.5),
    "DeepseekV3ForCausalLM": dict(num_nextn_predict_layers=2, aux_loss_alpha=0.3, ep_size=4),
}
REGRESSIONS = [  # id, tiny model, overrides, config.json edits after transformers saved it
    # a rope_scaling block added by hand next to the rope_parameters transformers wrote: it wins
    ("qwen3_moe_yarn_rope_scaling_by_hand", "qwen3_moe", {"rope_theta": 100.0},
     {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}}),
    # group score = the sum of a group's top-2 experts, though topk // topk_group = 3
    ("deepseek_groups_topk3", "deepseek_v3",
     {"n_routed_experts": 8, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 3}, {}),
    ("deepseek_groups_topk4_of_4_groups", "deepseek_v3",
     {"n_routed_experts": 16, "n_group": 4, "topk_group": 3, "num_experts_per_tok": 4}, {}),
    ("deepseek_q_lora_rank_null", "deepseek_v3", {"q_lora_rank": None}, {}),
    ("deepseek_yarn_mscale", "deepseek_v3",
     {"rope_parameters": dict(YARN, mscale=0.7, mscale_all_dim=0.5)}, {}),
    ("qwen3_attention_bias", "qwen3", {"attention_bias": True}, {}),
    ("qwen3_yarn_mscale_beta", "qwen3",
     {"rope_parameters": dict(YARN, mscale=0.7, mscale_all_dim=0.5, beta_fast=8, beta_slow=2)}, {}),
    ("mixtral_yarn", "mixtral", {"rope_parameters": YARN}, {}),
    ("qwen2_linear_rope", "qwen2", {"rope_scaling": {"rope_type": "linear", "factor": 3.0}}, {}),
    ("qwen3_moe_both_expert_spellings", "qwen3_moe", {"num_experts": 4, "num_local_experts": 8}, {}),
    ("unknown_key", "qwen3", {}, {"made_up_scaling": 2.0}),
]


def _flip_cases():
    cases = []
    for arch, tiny in TINY_OF.items():
        flips = {**COMMON_FLIPS, **ARCH_FLIPS[arch]}
        flips.pop("architectures", None)
        for key, value in flips.items():
            overrides = value if isinstance(value, dict) and key not in (
                "rope_parameters", "rope_scaling", "quantization_config") else {key: value}
            cases.append((f"{tiny}-{key}", tiny, overrides, {}))
        for key, value in IRRELEVANT_FLIPS.get(arch, {}).items():
            cases.append((f"{tiny}-irrelevant-{key}", tiny, {key: value}, {}))
    return cases + REGRESSIONS


@pytest.fixture(scope="module")
def flip_results(tmp_path_factory):
    from tests.distributed import config_workers

    return spawn(config_workers.flips, 1, str(tmp_path_factory.mktemp("flips")), _flip_cases())


@pytest.mark.parametrize("arch", sorted(TINY_OF))
def test_every_mapped_key_has_a_flip(arch):
    """The table below covers every key the mapping reads: adding a key to the mapping without
    a flip here fails."""
    flipped = set(COMMON_FLIPS) | set(ARCH_FLIPS[arch])
    assert (COMMON_MAPPED | ARCHITECTURES[arch].mapped) - {"architectures"} <= flipped


def _assert_exact_or_refused(r, key):
    if r["outcome"] == "ok":
        assert r["max_abs_diff"] <= TOL, r
        assert r["logit_scale"] > 0.1, r
    elif r["outcome"] == "refused":
        msg = r["message"]
        assert "\n" not in msg and len(msg) < 600, msg
        assert key in msg, f"the refusal does not name {key!r}: {msg}"
    else:  # transformers cannot run it: we must not import it either
        assert r["ours"] != "NO ERROR", r


@pytest.mark.parametrize("case", [c[0] for c in _flip_cases() if "-irrelevant-" not in c[0]
                                  and c not in REGRESSIONS])
def test_flipped_key_gives_transformers_logits_or_a_refusal_naming_it(flip_results, case):
    _assert_exact_or_refused(flip_results[case], case.split("-", 1)[1])


@pytest.mark.parametrize("case", [c[0] for c in _flip_cases() if "-irrelevant-" in c[0]])
def test_irrelevant_key_leaves_the_logits_unchanged(flip_results, case):
    r = flip_results[case]
    assert r["outcome"] == "ok" and r["max_abs_diff"] <= TOL, r


@pytest.mark.parametrize("case", [c[0] for c in REGRESSIONS if c[0] != "unknown_key"])
def test_real_checkpoint_option_imports_exactly(flip_results, case):
    from megatron_rl.model.build import mla_norms_full_rank_queries

    r = flip_results[case]
    if case == "deepseek_q_lora_rank_null" and mla_norms_full_rank_queries():
        # megatron-core 0.19 adds a norm transformers lacks: refused, saying so
        assert r["outcome"] == "refused" and "q_lora_rank=None" in r["message"], r
        return
    assert r["outcome"] == "ok", r
    assert r["max_abs_diff"] <= TOL and r["logit_scale"] > 0.1, r


def test_unknown_key_is_refused_naming_key_value_and_the_flag(flip_results):
    msg = flip_results["unknown_key"]["message"]
    assert "made_up_scaling=2.0" in msg and "--allow-unknown-config-keys" in msg, msg


def test_the_flip_table_exercises_both_outcomes(flip_results):
    """Not vacuous: many flips import exactly and many are refused."""
    outcomes = [r["outcome"] for r in flip_results.values()]
    assert outcomes.count("ok") >= 40 and outcomes.count("refused") >= 15, outcomes


def test_tiny_models_cover_every_architecture():
    assert set(TINY_OF.values()) == set(TINY) and set(TINY_OF) == set(ARCHITECTURES)
