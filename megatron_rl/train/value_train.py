"""The critic through Megatron's schedule: its values (forward only, like the old log-probs) and
the value-loss update, under any TP / PP / EP / CP / DP layout.

Values come back in the loss view ``[B, 2C]`` (``parallel.loss``), in label coordinates: the
value at position ``p`` is that of the state whose next token is ``p + 1``, the action the
policy's log-prob at ``p`` is about. The loss scaling contract is the policy's
(``megatron_loss.megatron_loss_scale``): each rank's loss is its partial share over global
denominators, so the step's gradient is the plain sum over micro-batches and DP x CP ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_rl.algo.value import ev_moments, value_loss
from megatron_rl.model.cpu_modes import cpu_modes_suspended
from megatron_rl.parallel.groups import ParallelGroups
from megatron_rl.train.megatron_loss import (PolicyMicroBatch, megatron_loss_scale, model_forward,
                                             schedule_shapes)

Tensor = torch.Tensor


@dataclass(frozen=True)
class ValueLossSpec:
    """The critic loss's settings and the update's global denominators."""

    num_tokens: Tensor
    num_seqs: Tensor
    clip: Optional[float] = None
    agg: str = "token-mean"
    norm_constant: float = 1.0


def values_view(mb: PolicyMicroBatch, output: Tensor) -> Tensor:
    """The model's ``[b, s, 1]`` output as this rank's ``[B, 2C]`` view (labels' layout)."""
    return mb.shard.view(output.squeeze(-1).reshape(mb.labels.shape))


def forward_values(model: List, micro_batches: List[PolicyMicroBatch],
                   groups: ParallelGroups) -> List[Tensor]:
    """The critic's values ``[B, 2C]`` of each micro-batch, forward only (last pipeline stage;
    other stages get [])."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    @cpu_modes_suspended()
    def value_func(mb, output):
        """No loss (a forward only): the values, detached."""
        v = values_view(mb, output)
        return v.sum() * 0, {"values": v.detach()}

    def step(data, chunk_model):
        """Megatron's forward step: the critic's output and the function that reads its values."""
        mb = next(data)
        return model_forward(mb, chunk_model, replay_routes=False), partial(value_func, mb)

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(micro_batches), model=model,
            num_microbatches=len(micro_batches), forward_only=True,
            **schedule_shapes(model, micro_batches, groups.cp_size))
    return [o["values"] for o in out]


@cpu_modes_suspended()
def _value_loss_func(mb: PolicyMicroBatch, target: Tuple[Tensor, Tensor], spec: ValueLossSpec,
                     scale: float, output: Tensor):
    old_values, returns = target
    v = values_view(mb, output)
    loss, metrics = value_loss(v, old_values, returns, mb.shard.mask, num_tokens=spec.num_tokens,
                               num_seqs=spec.num_seqs, clip=spec.clip, agg=spec.agg,
                               norm_constant=spec.norm_constant, seq_lengths=mb.shard.seq_lengths,
                               ops=mb.shard.ops)
    logged = {**{k: x.detach() for k, x in metrics.items()},
              "ev_moments": ev_moments(v, returns, mb.shard.mask)}
    return loss * scale, logged


def value_forward_backward(model: List, micro_batches: List[PolicyMicroBatch],
                           targets: Sequence[Tuple[Tensor, Tensor]], spec: ValueLossSpec,
                           groups: ParallelGroups) -> List[Dict[str, Tensor]]:
    """Forward and backward of the value loss over this rank's micro-batches; ``targets[i]`` =
    ``(old values, returns)`` ``[B, 2C]`` of micro-batch ``i``. Gradients land in the DDP buffers.
    Returns the per-micro-batch partial metrics (last pipeline stage only)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    scale = megatron_loss_scale(len(micro_batches), groups.dp_size)
    pairs = iter(list(zip(micro_batches, targets)))

    def step(data, chunk_model):
        """Megatron's forward step: the critic's output and its value loss."""
        mb, target = next(data)
        return (model_forward(mb, chunk_model, replay_routes=False),
                partial(_value_loss_func, mb, target, spec, scale))

    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=pairs, model=model,
        num_microbatches=len(micro_batches), forward_only=False,
        **schedule_shapes(model, micro_batches, groups.cp_size))
