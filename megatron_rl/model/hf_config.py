"""Hugging Face ``config.json`` -> megatron-core ``TransformerConfig`` arguments, per architecture.

Reads the config as a plain dict (no transformers import). Each architecture maps the fields
Megatron needs; anything that changes the math and is not supported fails with the field's name.
Router semantics: HF's "softmax over all experts, top-k, renormalise" (``norm_topk_prob``,
Mixtral) equals Megatron's default top-k-then-softmax (``moe_router_pre_softmax=False``); without
renormalisation (``norm_topk_prob: false``) it is ``moe_router_pre_softmax=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Union

import torch


@dataclass(frozen=True)
class HFModel:
    """What the model builder needs from a HF config: TransformerConfig fields and GPTModel args."""

    architecture: str
    config: Dict[str, Any]          # TransformerConfig keyword arguments (model shape only)
    vocab_size: int
    max_position_embeddings: int
    rotary_base: float
    tie_word_embeddings: bool

    @property
    def num_experts(self) -> int:
        return self.config.get("num_moe_experts") or 0


ARCHITECTURES: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {}


def _arch(*names: str):
    def register(fn):
        for n in names:
            ARCHITECTURES[n] = fn
        return fn
    return register


def load_hf_config(path_or_dict: Union[str, Path, Dict[str, Any]]) -> HFModel:
    """From a model directory, a ``config.json`` path, or the dict itself."""
    if isinstance(path_or_dict, dict):
        hf = path_or_dict
    else:
        p = Path(path_or_dict)
        p = p / "config.json" if p.is_dir() else p
        if not p.is_file():
            raise ValueError(f"model.hf_config: {p} does not exist (give a Hugging Face model "
                             "directory or its config.json)")
        try:
            hf = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"model.hf_config: {p} is not valid JSON ({e})") from None
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in ARCHITECTURES:
        raise ValueError(f"model.hf_config: architecture {arch!r} is not supported; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    cfg = _common(hf)
    cfg.update(ARCHITECTURES[arch](hf))
    if cfg.get("kv_channels", 0) is None:
        del cfg["kv_channels"]
    rope_kinds = ("default", None, "yarn") if cfg.get("multi_latent_attention") else ("default", None)
    return HFModel(arch, cfg, int(_need(hf, "vocab_size")), int(hf.get("max_position_embeddings", 4096)),
                   _rope_theta(hf, rope_kinds), bool(hf.get("tie_word_embeddings", False)))


def _need(hf: Dict[str, Any], key: str):
    if key not in hf:
        raise ValueError(f"model.hf_config: config.json has no {key!r}, which "
                         f"{(hf.get('architectures') or ['this architecture'])[0]} needs")
    return hf[key]


def _rope(hf: Dict[str, Any]) -> Dict[str, Any]:
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def _rope_theta(hf: Dict[str, Any], allowed=("default", None)) -> float:
    rope = _rope(hf)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in allowed:
        raise ValueError(f"model.hf_config: rope type {kind!r} is not supported (only default RoPE)")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _common(hf: Dict[str, Any]) -> Dict[str, Any]:
    heads = int(_need(hf, "num_attention_heads"))
    hidden = int(_need(hf, "hidden_size"))
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"model.hf_config: hidden_act {hf['hidden_act']!r} is not supported (silu)")
    if hf.get("sliding_window") and hf.get("use_sliding_window", True):
        raise ValueError("model.hf_config: sliding-window attention is not supported; set "
                         "use_sliding_window: false or sliding_window: null")
    return dict(
        num_layers=int(_need(hf, "num_hidden_layers")),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=int(hf.get("head_dim") or hidden // heads),
        ffn_hidden_size=int(_need(hf, "intermediate_size")),
        normalization="RMSNorm",
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(hf.get("attention_bias", False)),
        hidden_dropout=0.0,
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
    )


@_arch("Qwen2ForCausalLM")
def _qwen2(hf):
    return dict(add_qkv_bias=True)


@_arch("Qwen3ForCausalLM")
def _qwen3(hf):
    return dict(qk_layernorm=True)


@_arch("Qwen3MoeForCausalLM")
def _qwen3_moe(hf):
    n = int(hf.get("num_hidden_layers"))
    step = int(hf.get("decoder_sparse_step", 1))
    dense = set(hf.get("mlp_only_layers") or [])
    freq = [0 if (i in dense or (i + 1) % step) else 1 for i in range(n)]
    return dict(
        qk_layernorm=True,
        # transformers 5 writes num_local_experts; released Qwen3-MoE configs say num_experts
        num_moe_experts=int(hf["num_local_experts"] if "num_experts" not in hf and "num_local_experts" in hf
                            else _need(hf, "num_experts")),
        moe_router_topk=int(_need(hf, "num_experts_per_tok")),
        moe_ffn_hidden_size=int(_need(hf, "moe_intermediate_size")),
        moe_router_pre_softmax=not bool(hf.get("norm_topk_prob", True)),
        moe_layer_freq=freq if 0 in freq else 1,
    )


@_arch("DeepseekV3ForCausalLM")
def _deepseek_v3(hf):
    """MLA (low-rank q/kv with RMSNorm on the latents, decoupled RoPE dims), shared experts,
    sigmoid router with a load-balancing bias (noaux_tc), group-limited routing, the first
    ``first_k_dense_replace`` layers dense. Built with ``MLATransformerConfig``."""
    if not hf.get("norm_topk_prob", True):
        raise ValueError("model.hf_config: DeepseekV3 with norm_topk_prob: false is not supported "
                         "(megatron-core normalises sigmoid top-k weights)")
    if hf.get("topk_method", "noaux_tc") != "noaux_tc" or hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise ValueError("model.hf_config: DeepseekV3 needs scoring_func sigmoid with topk_method "
                         "noaux_tc (DeepSeek-V2's softmax routers are not supported)")
    n = int(hf["num_hidden_layers"])
    dense = int(hf.get("first_k_dense_replace", 0))
    rope = _rope(hf)
    yarn = dict(rope_type="rope") if rope.get("rope_type", rope.get("type")) != "yarn" else dict(
        rope_type="yarn", rotary_scaling_factor=float(rope["factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        beta_fast=float(rope.get("beta_fast", 32)), beta_slow=float(rope.get("beta_slow", 1)),
        mscale=float(rope.get("mscale", 1.0)), mscale_all_dim=float(rope.get("mscale_all_dim", 0.0)))
    groups = hf.get("n_group") or 1
    return dict(
        multi_latent_attention=True, qk_layernorm=True, **yarn,
        rotary_base=_rope_theta(hf, ("default", None, "yarn")),
        q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=int(_need(hf, "kv_lora_rank")),
        qk_head_dim=int(_need(hf, "qk_nope_head_dim")),
        qk_pos_emb_head_dim=int(_need(hf, "qk_rope_head_dim")),
        v_head_dim=int(_need(hf, "v_head_dim")),
        num_query_groups=int(hf["num_attention_heads"]), kv_channels=None,
        num_moe_experts=int(_need(hf, "n_routed_experts")),
        moe_router_topk=int(_need(hf, "num_experts_per_tok")),
        moe_ffn_hidden_size=int(_need(hf, "moe_intermediate_size")),
        moe_shared_expert_intermediate_size=(int(hf.get("n_shared_experts") or 0)
                                             * int(hf["moe_intermediate_size"])) or None,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_pre_softmax=True,
        moe_router_num_groups=groups if groups > 1 else None,
        moe_router_group_topk=hf.get("topk_group") if groups > 1 else None,
        moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        moe_layer_freq=[0] * dense + [1] * (n - dense),
    )


@_arch("MixtralForCausalLM")
def _mixtral(hf):
    return dict(
        num_moe_experts=int(_need(hf, "num_local_experts")),
        moe_router_topk=int(_need(hf, "num_experts_per_tok")),
        moe_ffn_hidden_size=int(_need(hf, "intermediate_size")),
        moe_router_pre_softmax=False,
    )
