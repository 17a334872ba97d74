"""Tiny Hugging Face configs (random weights, built offline) for CPU tests and the CPU demo."""

from __future__ import annotations

import copy
from typing import Any, Dict

# RoPE only: the position limit costs nothing; 32k lets the long-response recipes run unchanged
_BASE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, intermediate_size=128, rms_norm_eps=1e-6,
             rope_theta=10000.0, max_position_embeddings=32768, tie_word_embeddings=False,
             hidden_act="silu", torch_dtype="float32")

TINY: Dict[str, Dict[str, Any]] = {
    "qwen3_moe": dict(_BASE, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3": dict(_BASE, architectures=["Qwen3ForCausalLM"], model_type="qwen3"),
    "qwen2": dict(_BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                  use_sliding_window=False),
    "deepseek_v3": dict(_BASE, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
                        head_dim=16,  # transformers: the rotary dim, = qk_rope_head_dim
                        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                        qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=4, n_shared_experts=1,
                        num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                        n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                        scoring_func="sigmoid", topk_method="noaux_tc", rope_scaling=None),
    "mixtral": dict(_BASE, architectures=["MixtralForCausalLM"], model_type="mixtral",
                    num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
}


def tiny_hf_config(name: str, **overrides) -> Dict[str, Any]:
    """The tiny random-weight HF config named ``name`` (the test and demo models), with
    ``overrides``; an unknown name fails listing the known."""
    if name not in TINY:
        raise KeyError(f"unknown tiny model {name!r}; known: {', '.join(TINY)}")
    return dict(copy.deepcopy(TINY[name]), **overrides)


def write_tiny_hf_model(name: str, path, seed: int = 0, reward_model: bool = False,
                        **overrides) -> Dict[str, Any]:
    """A random-init tiny HF model saved as safetensors at ``path`` (offline, through
    transformers); returns its config dict. The starting point of the CPU demo and the tests.
    ``reward_model``: the architecture's one-label ``*ForSequenceClassification`` instead."""
    import torch
    from transformers import (AutoConfig, AutoModelForCausalLM,
                              AutoModelForSequenceClassification)

    cfg = tiny_hf_config(name, **overrides)
    if reward_model:
        cfg["architectures"] = [cfg["architectures"][0].replace("ForCausalLM",
                                                                "ForSequenceClassification")]
        cfg["num_labels"] = 1
    kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "torch_dtype")}
    config = AutoConfig.for_model(cfg["model_type"], **kwargs)
    config.architectures = cfg["architectures"]
    auto = AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = auto.from_config(config, dtype=torch.float32)
        # HF initialises biases (and DeepSeek's routing bias) to zero and norms to one: a
        # mapping that dropped or swapped them would go unseen
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.data.uniform_(-0.1, 0.1)
        for pname, p in model.named_parameters():
            if pname.endswith(".bias"):
                p.data.uniform_(-0.1, 0.1)
            elif "norm" in pname:
                p.data.uniform_(0.8, 1.2)
    model.save_pretrained(str(path))
    return cfg
