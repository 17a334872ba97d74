"""Megatron-Core's optimizer (Adam; distributed optimizer with fp32 main weights when asked) and
its learning-rate schedule, from plain numbers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from megatron_rl.parallel.collectives import all_reduce_nograd


@dataclass(frozen=True)
class OptimSettings:
    """One model's optimizer settings and learning-rate schedule (policy or critic)."""
    lr: float
    min_lr: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    total_steps: int = 1
    decay_style: str = "constant"          # constant | linear | cosine
    distributed: bool = True
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8


def build_optimizer(model: List, settings: OptimSettings, params_dtype: torch.dtype):
    """``(optimizer, scheduler)``. bf16 parameters get fp32 main weights and Adam states."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    cfg = OptimizerConfig(
        optimizer="adam", lr=settings.lr, min_lr=settings.min_lr,
        weight_decay=settings.weight_decay, clip_grad=settings.max_grad_norm,
        adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
        bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
        use_distributed_optimizer=settings.distributed)
    optimizer = get_megatron_optimizer(cfg, model)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if settings.warmup_steps else settings.lr, max_lr=settings.lr,
        min_lr=settings.min_lr, lr_warmup_steps=settings.warmup_steps,
        lr_decay_steps=max(settings.total_steps, settings.warmup_steps + 1),
        lr_decay_style=settings.decay_style, start_wd=settings.weight_decay,
        end_wd=settings.weight_decay, wd_incr_steps=max(settings.total_steps, 1),
        wd_incr_style="constant")
    return optimizer, scheduler


def nonfinite_flag(model: List, losses: List[torch.Tensor]) -> torch.Tensor:
    """1.0 when this rank holds a non-finite gradient (any model chunk's dense or expert gradient
    buffer) or a non-finite loss, else 0.0; a tensor on the device, no host sync.

    A buffer's sum is non-finite iff an element is (or the sum overflows, past 3e38: an update
    worth skipping too); unlike ``isfinite(buffer)`` it allocates no buffer-sized mask, which
    for a large model's gradient shard would be gigabytes."""
    flags = [~torch.isfinite(buf.grad_data.sum())
             for chunk in model for buf in chunk.buffers + chunk.expert_parallel_buffers]
    flags += [~torch.isfinite(x.detach()).all() for x in losses]
    if not flags:
        return torch.zeros(())
    return torch.stack(flags).any().float()


def optimizer_step(optimizer, scheduler, nonfinite: torch.Tensor, group):
    """One update, or none: returns ``(applied, grad_norm, num_zeros)``.

    ``nonfinite`` is this rank's ``nonfinite_flag``; its maximum over ``group`` (the world: every
    rank must take the same decision) decides. With a NaN or Inf anywhere the update is skipped
    before Megatron's optimizer sees it: weights, Adam moments and step count, and the learning
    rate schedule stay as they were. Megatron alone would not skip it: without a loss scaler (fp32,
    or bf16 without loss scaling) it clips by a NaN norm and writes NaN into every weight.
    The decision costs one host sync per update, which Megatron's own grad-norm already makes."""
    bad = all_reduce_nograd(nonfinite.reshape(1).float(), group, torch.distributed.ReduceOp.MAX)
    if bool(bad):
        return False, None, None
    applied, grad_norm, num_zeros = optimizer.step()
    if applied:
        scheduler.step(increment=1)
    return applied, grad_norm, num_zeros
