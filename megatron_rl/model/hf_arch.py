"""Per-architecture mapping of a resolved Hugging Face config to megatron-core settings.

Each architecture lists the ``config.json`` keys its builder reads (``mapped``: honoured or refused
by value) and the keys that cannot change the forward pass (``irrelevant``, with the reason). The
builders take transformers' own config object, so absent keys carry transformers' defaults and old
and new spellings (``rope_scaling`` / ``rope_parameters``, ``num_experts`` / ``num_local_experts``)
follow transformers' precedence. What megatron-core cannot express exactly is refused naming the
key and its value: an import is exact or it fails.

Router semantics: HF's "softmax over all experts, top-k, renormalise" (``norm_topk_prob``,
Mixtral) equals Megatron's default top-k-then-softmax (``moe_router_pre_softmax=False``); without
renormalisation (``norm_topk_prob: false``) it is ``moe_router_pre_softmax=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Tuple

import torch


def refuse(key: str, value: Any, why: str) -> ValueError:
    """The ``ValueError`` for an unsupported config value, naming the key and why."""
    return ValueError(f"model.hf_config: {key}={value!r} is not supported: {why}")


@dataclass(frozen=True)
class Arch:
    """How one HF architecture's config becomes megatron-core's: the builder and the keys it reads,
    ignores or needs."""
    model_type: str                              # transformers' config class key
    build: Callable[[Any], Dict[str, Any]]       # resolved config -> TransformerConfig kwargs
    mapped: FrozenSet[str]
    irrelevant: Dict[str, str] = field(default_factory=dict)
    required: Tuple[str, ...] = ()               # keys without a usable default ("a|b": either)


# keys every architecture reads (through ``common`` and ``rope``)
COMMON_MAPPED = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "rms_norm_eps", "hidden_act", "attention_dropout", "max_position_embeddings",
    "tie_word_embeddings", "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor",
    "quantization_config", "pretraining_tp", "architectures"})

COMMON_IRRELEVANT = {
    "_name_or_path": "provenance", "transformers_version": "provenance",
    "model_type": "the architecture is read from `architectures`",
    "dtype": "storage dtype (convert --dtype auto reads it)", "torch_dtype": "storage dtype",
    "use_cache": "generation cache", "bos_token_id": "tokenizer ids", "eos_token_id": "tokenizer ids",
    "pad_token_id": "the embedding's padding index changes only HF's initialisation",
    "initializer_range": "initialisation", "output_attentions": "extra outputs",
    "output_hidden_states": "extra outputs", "return_dict": "output container",
    "output_router_logits": "extra outputs", "id2label": "classification heads",
    "label2id": "classification heads", "problem_type": "classification heads",
    "chunk_size_feed_forward": "HF's chunking is exact", "is_encoder_decoder": "decoder-only class",
    "tokenizer_class": "tokenizer", "router_aux_loss_coef": "a training loss: model.router_aux_loss_coef",
    "auto_map": "remote code is not run: transformers' implementation is the reference",
}


def common(c) -> Dict[str, Any]:
    """The TransformerConfig keywords every architecture shares; unsupported settings refused."""
    if c.hidden_act != "silu":
        raise refuse("hidden_act", c.hidden_act, "only silu (SwiGLU) MLPs are mapped")
    quant = getattr(c, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else type(quant).__name__
        raise refuse("quantization_config", {"quant_method": method}, "quantized weights are not "
                     "imported; dequantize the checkpoint to bf16 first")
    if int(getattr(c, "pretraining_tp", 1) or 1) != 1:
        raise refuse("pretraining_tp", c.pretraining_tp, "transformers' sliced linear layers")
    heads = int(c.num_attention_heads)
    return dict(
        num_layers=int(c.num_hidden_layers), hidden_size=int(c.hidden_size),
        num_attention_heads=heads, num_query_groups=int(c.num_key_value_heads or heads),
        kv_channels=int(getattr(c, "head_dim", None) or c.hidden_size // heads),
        ffn_hidden_size=int(c.intermediate_size), normalization="RMSNorm",
        layernorm_epsilon=float(c.rms_norm_eps), gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=float(c.attention_dropout or 0.0),
    )


def no_sliding_window(c) -> None:
    """Sliding-window attention is not mapped: refuse when any layer would use it."""
    window = getattr(c, "sliding_window", None)
    types = getattr(c, "layer_types", None)
    if types is not None:
        if any(t != "full_attention" for t in types):
            key = "use_sliding_window" if getattr(c, "use_sliding_window", False) else "layer_types"
            raise refuse(key, getattr(c, key), "sliding-window attention is not mapped (set "
                         "use_sliding_window: false, or max_window_layers >= num_hidden_layers)")
    elif window is not None:
        key = "use_sliding_window" if getattr(c, "use_sliding_window", False) else "sliding_window"
        raise refuse(key, getattr(c, key), "sliding-window attention is not mapped "
                     "(set use_sliding_window: false or sliding_window: null)")


def _mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def rope(c, mla: bool) -> Tuple[float, Dict[str, Any], Dict[str, Any]]:
    """``(rope_theta, TransformerConfig kwargs, GPTModel rotary kwargs)`` from transformers'
    resolved ``rope_parameters``. Supported: default, linear, and YaRN (every architecture); the
    others (dynamic NTK, llama3, longrope, ...) are refused."""
    p = dict(getattr(c, "rope_parameters", None) or {})
    kind = p.get("rope_type", p.get("type", "default"))
    theta = float(p.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    partial = p.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise refuse("partial_rotary_factor", partial, "partial rotary embeddings are not mapped")
    if kind == "default":  # MLATransformerConfig's own default is YaRN: say "rope"
        return theta, {"rope_type": "rope"} if mla else {}, {
            "position_embedding_type": "none" if mla else "rope"}
    if kind == "linear" and not mla:
        return theta, {}, {"position_embedding_type": "rope",
                           "seq_len_interpolation_factor": float(p["factor"])}
    if kind != "yarn":
        raise ValueError(f"model.hf_config: rope_type={kind!r} (of rope_scaling / "
                         "rope_parameters) is not supported: RoPE types default, linear (not "
                         "with multi-latent attention) and yarn are mapped")
    original = int(p["original_max_position_embeddings"])
    factor = float(p["factor"]) if p.get("factor") is not None else c.max_position_embeddings / original
    m, m_all = p.get("mscale"), p.get("mscale_all_dim")
    # transformers' cos/sin factor (modeling_rope_utils._compute_yarn_parameters)
    attention = p.get("attention_factor")
    if attention is None:
        attention = _mscale(factor, m) / _mscale(factor, m_all) if m and m_all else _mscale(factor)
    yarn = dict(rotary_scaling_factor=factor, original_max_position_embeddings=original,
                beta_fast=float(p.get("beta_fast") or 32.0), beta_slow=float(p.get("beta_slow") or 1.0),
                correction_range_round_to_int=bool(p.get("truncate", True)))
    if mla:
        # megatron's MLA scales cos/sin by mscale(m) / mscale(m_all) and the softmax by
        # mscale(m_all)^2, as transformers' DeepSeek-V3 does when it reads mscale_all_dim
        mc_m, mc_all = (float(m) if m and m_all else 1.0), float(m_all or 0.0)
        if abs(_mscale(factor, mc_m) / _mscale(factor, mc_all) - attention) > 1e-12:
            raise refuse("rope_parameters", {k: p.get(k) for k in ("attention_factor", "mscale",
                         "mscale_all_dim")}, "this YaRN attention factor has no megatron-core "
                         "multi-latent-attention equivalent")
        if not yarn.pop("correction_range_round_to_int"):
            raise refuse("rope_parameters.truncate", False, "megatron-core's multi-latent "
                         "attention always truncates the YaRN correction range")
        return theta, dict(rope_type="yarn", mscale=mc_m, mscale_all_dim=mc_all, **yarn), {
            "position_embedding_type": "none"}
    # GPT YaRN: megatron-core scales cos/sin by mscale(factor) (yarn_mscale 1, mscale_all_dim 0);
    # any other transformers factor scales every attention logit by (attention / that)^2, which
    # the softmax scale carries
    gpt = {"position_embedding_type": "yarn",
           "yarn": {f"yarn_{k}": v for k, v in yarn.items()} | {"yarn_mscale": 1.0,
                                                                "yarn_mscale_all_dim": 0.0}}
    ratio = attention / _mscale(factor)
    head = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    extra = {} if abs(ratio - 1.0) < 1e-12 else {"softmax_scale": ratio ** 2 / math.sqrt(head)}
    return theta, extra, gpt


def _gqa(c) -> Dict[str, Any]:
    out = common(c)
    no_sliding_window(c)
    theta, extra, gpt_rope = rope(c, mla=False)
    out.update(extra)
    out["_rotary_base"], out["_gpt_rope"] = theta, gpt_rope
    return out


def _qwen2(c):
    # transformers' Qwen2 always has q/k/v biases and no o_proj bias
    return dict(_gqa(c), add_qkv_bias=True)


def _qwen3(c):
    # attention_bias: q/k/v *and* o_proj biases (o_proj's through layer_spec's biased linear_proj)
    return dict(_gqa(c), qk_layernorm=True, add_qkv_bias=bool(c.attention_bias),
                _proj_bias=bool(c.attention_bias))


def _experts(c, count: int, renormalised: bool = True) -> Dict[str, Any]:
    topk = int(c.num_experts_per_tok)
    if not 1 <= topk <= count:
        raise refuse("num_experts_per_tok", topk, f"needs 1 <= num_experts_per_tok <= {count} experts")
    if topk == 1 and renormalised:  # a weight of exactly 1: megatron-core has no such router
        raise refuse("num_experts_per_tok", 1, "a renormalised single expert (weight 1) has no "
                     "megatron-core router")
    return dict(num_moe_experts=count, moe_router_topk=topk)


def _qwen3_moe(c):
    n, step = int(c.num_hidden_layers), int(c.decoder_sparse_step)
    count = int(c.num_experts)
    if count < 1:
        raise refuse("num_experts", count, "a model without experts is Qwen3ForCausalLM")
    if step < 1:
        raise refuse("decoder_sparse_step", step, "must be >= 1")
    dense = set(c.mlp_only_layers or [])
    freq = [0 if (i in dense or (i + 1) % step) else 1 for i in range(n)]
    if 1 not in freq:
        raise refuse("mlp_only_layers", sorted(dense), "every layer dense: use Qwen3ForCausalLM")
    return dict(_qwen3(c), **_experts(c, count, bool(c.norm_topk_prob)), moe_ffn_hidden_size=int(c.moe_intermediate_size),
                moe_router_pre_softmax=not bool(c.norm_topk_prob),
                moe_layer_freq=freq if 0 in freq else 1)


def _mixtral(c):
    return dict(_gqa(c), **_experts(c, int(c.num_local_experts)),
                moe_ffn_hidden_size=int(c.intermediate_size), moe_router_pre_softmax=False)


def _deepseek_refusals(c) -> None:
    if not c.norm_topk_prob:
        raise refuse("norm_topk_prob", False, "megatron-core normalises sigmoid top-k weights")
    for key, want in (("topk_method", "noaux_tc"), ("scoring_func", "sigmoid")):
        if getattr(c, key, want) != want:
            raise refuse(key, getattr(c, key), "transformers' DeepseekV3 routes with a sigmoid "
                         "and the noaux_tc bias only (DeepSeek-V2 routers are not mapped)")
    if getattr(c, "moe_layer_freq", 1) != 1:
        raise refuse("moe_layer_freq", c.moe_layer_freq, "transformers' DeepseekV3 makes every "
                     "layer after first_k_dense_replace an MoE layer")
    if c.attention_bias:
        raise refuse("attention_bias", True, "megatron-core's MLA projections have no biases")
    if not c.rope_interleave:
        raise refuse("rope_interleave", False, "megatron-core's MLA applies the interleaved "
                     "(DeepSeek) rotary layout")
    if float(c.rms_norm_eps) != 1e-6:
        raise refuse("rms_norm_eps", c.rms_norm_eps, "transformers' DeepseekV3 normalises the "
                     "q/kv latents with epsilon 1e-6 whatever rms_norm_eps says; megatron-core "
                     "uses one epsilon for every norm")
    if int(c.head_dim) != int(c.qk_rope_head_dim):
        raise refuse("head_dim", c.head_dim, f"transformers' rotary embedding takes head_dim, "
                     f"which must equal qk_rope_head_dim ({c.qk_rope_head_dim})")
    heads = int(c.num_attention_heads)
    if int(c.num_key_value_heads or heads) != heads:
        raise refuse("num_key_value_heads", c.num_key_value_heads, "multi-latent attention has "
                     f"one key/value head per query head ({heads})")
    count, topk = int(c.n_routed_experts), int(c.num_experts_per_tok)
    groups, group_topk = int(c.n_group or 1), int(c.topk_group or 1)
    if not 1 <= group_topk <= groups:
        raise refuse("topk_group", group_topk, f"must be between 1 and n_group ({groups})")
    if groups > 1 and (count % groups or count // groups < 2 or group_topk * (count // groups) < topk):
        raise refuse("n_group", groups, f"group-limited routing needs n_group to divide "
                     f"n_routed_experts ({count}) into groups of >= 2 experts, and topk_group "
                     f"({group_topk}) groups to hold num_experts_per_tok ({topk}) experts")


def _deepseek_v3(c):
    """MLA (low-rank or full-rank queries, low-rank kv with RMSNorm on the latents, decoupled
    RoPE dims), shared experts, sigmoid router with a load-balancing bias (noaux_tc),
    group-limited routing (transformers' group score: the sum of each group's top-2 experts, see
    ``model.router``), the first ``first_k_dense_replace`` layers dense. Built with
    ``MLATransformerConfig``."""
    _deepseek_refusals(c)
    heads, count = int(c.num_attention_heads), int(c.n_routed_experts)
    groups = int(c.n_group or 1)
    n, dense = int(c.num_hidden_layers), int(c.first_k_dense_replace)
    out = common(c)
    theta, rope_cfg, gpt_rope = rope(c, mla=True)
    out.update(rope_cfg)
    q_lora = c.q_lora_rank
    return dict(
        out, _rotary_base=theta, _gpt_rope=gpt_rope, rotary_base=theta,
        multi_latent_attention=True, qk_layernorm=True,
        q_lora_rank=int(q_lora) if q_lora else None, kv_lora_rank=int(c.kv_lora_rank),
        qk_head_dim=int(c.qk_nope_head_dim), qk_pos_emb_head_dim=int(c.qk_rope_head_dim),
        v_head_dim=int(c.v_head_dim), num_query_groups=heads, kv_channels=None,
        **_experts(c, count), moe_ffn_hidden_size=int(c.moe_intermediate_size),
        moe_shared_expert_intermediate_size=(int(c.n_shared_experts or 0)
                                             * int(c.moe_intermediate_size)) or None,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_pre_softmax=True,
        moe_router_num_groups=groups if groups > 1 else None,
        moe_router_group_topk=int(c.topk_group) if groups > 1 else None,
        moe_router_topk_scaling_factor=float(c.routed_scaling_factor),
        moe_layer_freq=[0] * min(dense, n) + [1] * max(n - dense, 0),
    )


_QWEN_ATTN = frozenset({"head_dim", "sliding_window", "use_sliding_window", "max_window_layers",
                        "layer_types"})
ARCHITECTURES: Dict[str, Arch] = {
    "Qwen2ForCausalLM": Arch("qwen2", _qwen2, _QWEN_ATTN, {
        "attention_bias": "transformers' Qwen2 always has q/k/v biases and no o_proj bias"}),
    "Qwen3ForCausalLM": Arch("qwen3", _qwen3, _QWEN_ATTN | {"attention_bias"}),
    # transformers' Qwen3-MoE has no per-layer types: its window is all or nothing
    "Qwen3MoeForCausalLM": Arch("qwen3_moe", _qwen3_moe, _QWEN_ATTN - {"max_window_layers",
                                                                       "layer_types"} | {
        "attention_bias", "num_experts", "num_local_experts", "num_experts_per_tok",
        "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"}, {
        "max_window_layers": "transformers' Qwen3-MoE does not read it"},
        required=("num_experts|num_local_experts", "num_experts_per_tok", "moe_intermediate_size")),
    "MixtralForCausalLM": Arch("mixtral", _mixtral, frozenset({
        "head_dim", "sliding_window", "num_local_experts", "num_experts", "num_experts_per_tok"}), {
        "router_jitter_noise": "transformers adds it in training only; RL training never jitters"},
        required=("num_local_experts|num_experts", "num_experts_per_tok")),
    "DeepseekV3ForCausalLM": Arch("deepseek_v3", _deepseek_v3, frozenset({
        "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        "n_routed_experts", "num_local_experts", "n_shared_experts", "num_experts_per_tok",
        "moe_intermediate_size", "first_k_dense_replace", "n_group", "topk_group",
        "routed_scaling_factor", "norm_topk_prob", "rope_interleave", "attention_bias",
        "scoring_func", "topk_method", "moe_layer_freq", "head_dim"}), {
        "qk_head_dim": "transformers sets it to qk_nope_head_dim + qk_rope_head_dim",
        "num_nextn_predict_layers": "multi-token-prediction layers are not used in RL (skipped)",
        "num_mtp_layers": "multi-token-prediction layers are not used in RL (skipped)",
        "aux_loss_alpha": "a training loss", "seq_aux": "a training loss",
        "ep_size": "the original run's expert parallelism"},
        required=("n_routed_experts|num_local_experts", "num_experts_per_tok", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_intermediate_size")),
}
