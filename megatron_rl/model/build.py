"""Build a megatron-core ``GPTModel`` (dense or MoE) from a Hugging Face config.

``transformer_config`` turns the HF shape (``hf_config.HFModel``), the parallel layout and the
model options into a ``TransformerConfig``; ``layer_spec`` picks TransformerEngine modules when TE
is installed (``attention_backend: te|auto``) and otherwise Megatron's local modules with
``SDPAttention`` as the core attention; ``build_gpt_model`` builds this pipeline stage's model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_rl.model.hf_config import HFModel
from megatron_rl.parallel.config import Layout


def have_transformer_engine() -> bool:
    """Whether TransformerEngine imports."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class ModelOptions:
    """The model section's knobs the builder needs (see ``model.config.ModelConfig``)."""

    attention_backend: str = "auto"          # auto | sdpa | te
    token_dispatcher: str = "alltoall"       # alltoall | allgather
    grouped_gemm: bool = False
    router_aux_loss_coef: float = 0.0        # off for RL by default: peers found it hurts
    router_z_loss_coef: float = 0.0
    params_dtype: torch.dtype = torch.float32
    init_weights: bool = True                # False when a checkpoint overwrites every weight

    def use_te(self) -> bool:
        """Whether TransformerEngine modules are used (``ValueError`` when asked for and absent)."""
        if self.attention_backend == "te" and not have_transformer_engine():
            raise ValueError("model.attention_backend: te needs TransformerEngine, which is not "
                             "installed (use sdpa, or the GPU image)")
        return self.attention_backend == "te" or (self.attention_backend == "auto"
                                                  and have_transformer_engine())


def transformer_config(hf: HFModel, layout: Layout, opt: ModelOptions):
    """The megatron-core ``TransformerConfig`` of ``hf`` in ``layout`` with ``opt``."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    check_model_layout(hf, layout, opt)
    moe = {}
    if hf.num_experts:
        moe = dict(
            moe_token_dispatcher_type=opt.token_dispatcher,
            moe_grouped_gemm=opt.grouped_gemm,
            moe_router_load_balancing_type="aux_loss" if opt.router_aux_loss_coef else "none",
            moe_aux_loss_coeff=opt.router_aux_loss_coef,
            moe_z_loss_coeff=opt.router_z_loss_coef or None,
            moe_router_dtype="fp32",  # routing decisions must not flip with bf16 rounding
            moe_router_fusion=False,  # the fused router has no route-replay hook
        )
    gpu = torch.cuda.is_available()
    config_class = MLATransformerConfig if hf.config.get("multi_latent_attention") else TransformerConfig
    config = config_class(
        **hf.config, **moe,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp, expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        # Megatron requires sequence parallelism for MoE with TP > 1
        sequence_parallel=layout.sequence_parallel or (layout.tp > 1 and hf.num_experts > 0),
        params_dtype=opt.params_dtype, pipeline_dtype=opt.params_dtype,
        bf16=opt.params_dtype == torch.bfloat16, fp16=False,
        # fused kernels exist on GPU only
        bias_dropout_fusion=gpu, masked_softmax_fusion=gpu, gradient_accumulation_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=gpu,
        perform_initialization=opt.init_weights,
    )
    for name, value in hf.yarn:  # GPTModel's YaRN reads these with getattr; no config field
        setattr(config, name, value)
    return config


def check_model_layout(hf: HFModel, layout: Layout, opt: ModelOptions) -> None:
    """``ValueError`` naming both sides when a parallel size does not divide the model, or when
    the layout is one megatron-core gets wrong without TransformerEngine. The config check at load
    and the model builder both call this."""
    if hf.config.get("multi_latent_attention") and layout.tp > 1 and not opt.use_te():
        # measured: the local (non-TE) MLA modules give gradients off by ~1e-2 under TP2
        raise ValueError("parallel.tensor_model_parallel_size > 1 with multi-latent attention "
                         "(DeepSeek-V3) needs TransformerEngine: megatron-core's local modules "
                         "give wrong gradients under TP; use expert / pipeline / data "
                         "parallelism, or the GPU image")
    if hf.config.get("multi_latent_attention") and not hf.config.get("q_lora_rank") \
            and mla_norms_full_rank_queries():
        raise ValueError("model.hf_config: q_lora_rank=None (full-rank DeepSeek queries) is not "
                         "supported with this megatron-core (>= 0.19): its MLA normalises the "
                         "input of the full-rank query projection, which transformers' "
                         "DeepseekV3 does not; megatron-core 0.16 imports it exactly")
    c = hf.config
    rules = [
        (c["num_attention_heads"], layout.tp, "num_attention_heads", "tensor_model_parallel_size"),
        (c["num_query_groups"], layout.tp, "num_key_value_heads", "tensor_model_parallel_size"),
        (c["num_layers"], layout.pp, "num_hidden_layers", "pipeline_model_parallel_size"),
        (hf.vocab_size, layout.tp, "vocab_size", "tensor_model_parallel_size"),
    ]
    if hf.num_experts:
        rules.append((hf.num_experts, layout.ep, "num_experts", "expert_model_parallel_size"))
    for n, k, hf_name, par_name in rules:
        if n % k:
            raise ValueError(f"parallel.{par_name}={k} does not divide {hf_name}={n} of the model; "
                             f"choose a divisor of {n}")


def mla_norms_full_rank_queries() -> bool:
    """megatron-core >= 0.19 (``mla_qk_norm_config``) fuses a norm into MLA's full-rank query
    projection whenever the latents are normalised."""
    import importlib.util

    return importlib.util.find_spec("megatron.core.transformer.mla_qk_norm_config") is not None


def layer_spec(config, opt: ModelOptions, vp_stage: Optional[int] = None, proj_bias: bool = False):
    """The decoder block spec of this pipeline stage (dense and MoE layers as the config says)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    # lazy: config validation imports this module without megatron-core's model code
    from megatron_rl.model.attention import SDPAttention

    te = opt.use_te()
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=te, normalization="RMSNorm",
                                      vp_stage=vp_stage)
    if te and not proj_bias:
        return spec
    spec = copy.deepcopy(spec)  # the layer specs share submodule objects
    for layer in spec.layer_specs:
        attention = layer.submodules.self_attention.submodules
        if not te:
            attention.core_attention = SDPAttention
        if proj_bias:
            attention.linear_proj = _with_bias(attention.linear_proj)
    return spec


def _with_bias(linear_cls):
    """``linear_cls`` built with a bias whatever ``add_bias_linear`` says: Qwen3's
    ``attention_bias`` biases the output projection but not the MLPs, which megatron-core's one
    switch cannot express."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(linear_cls, ModuleSpec):
        return ModuleSpec(module=_with_bias(linear_cls.module), params=linear_cls.params,
                          submodules=linear_cls.submodules)

    class Biased(linear_cls):
        """``linear_cls`` with a bias."""
        def __init__(self, *args, bias: bool = False, **kwargs):
            super().__init__(*args, bias=True, **kwargs)

    Biased.__name__ = Biased.__qualname__ = f"Biased{linear_cls.__name__}"
    return Biased


def build_gpt_model(hf: HFModel, config, opt: ModelOptions, *, pre_process: bool = True,
                    post_process: bool = True, vp_stage: Optional[int] = None,
                    tie_embeddings: Optional[bool] = None):
    """``tie_embeddings`` overrides the HF config's ``tie_word_embeddings`` (the critic replaces
    the LM head, so it unties them)."""
    from megatron.core.models.gpt import GPTModel

    if config.moe_router_num_groups:
        # lazy: config validation imports this module without megatron-core's model code
        from megatron_rl.model.router import use_transformers_group_score

        use_transformers_group_score()
    return GPTModel(
        config=config, transformer_layer_spec=layer_spec(config, opt, vp_stage, hf.proj_bias),
        vocab_size=hf.vocab_size, max_sequence_length=hf.max_position_embeddings,
        pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=(hf.tie_word_embeddings if tie_embeddings is None
                                             else tie_embeddings),
        # multi-latent attention applies its own (decoupled) rotary embedding: "none" here
        **dict(hf.rotary), rotary_base=hf.rotary_base, vp_stage=vp_stage,
        parallel_output=True,
    )
