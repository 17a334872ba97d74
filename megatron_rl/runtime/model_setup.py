"""This rank's model chunk(s): GPTModel for its pipeline stage, wrapped in megatron-core DDP."""

from __future__ import annotations

from typing import List, Tuple

from megatron_rl.model.build import ModelOptions, build_gpt_model, transformer_config
from megatron_rl.model.hf_config import HFModel
from megatron_rl.model.routing_replay import install_route_replay
from megatron_rl.model.value_head import attach_value_head
from megatron_rl.parallel.config import Layout


def build_model(hf: HFModel, layout: Layout, opt: ModelOptions, *, ddp: bool = True,
                distributed_optimizer: bool = False, value_head: bool = False,
                value_head_init_std: float = 0.0, head_bias: bool = True) -> Tuple[List, object]:
    """``([model], transformer_config)``; with ``ddp`` the gradients go to fp32 buffers
    (``param.main_grad``), reduced over DP (x CP) and finalised by the schedule. ``value_head``
    builds the critic: the same trunk, a scalar ``ValueHead`` as ``output_layer``, embeddings
    untied; ``head_bias`` False: a reward model's bias-free ``score`` head."""
    from megatron.core import parallel_state as ps

    config = transformer_config(hf, layout, opt)
    model = build_gpt_model(hf, config, opt, pre_process=ps.is_pipeline_first_stage(),
                            post_process=ps.is_pipeline_last_stage(),
                            tie_embeddings=False if value_head else None)
    if value_head:
        model = attach_value_head(model, config, value_head_init_std, head_bias)
    if hf.num_experts:   # expert routes can be recorded, replayed and compared (train.routing_replay)
        install_route_replay([model], hf.moe_layers)
    if not ddp:
        return [model], config
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=distributed_optimizer)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    return [model], config


def unwrap(model):
    """The GPTModel inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)
