"""The ONE adapter between our sharded policy loss and Megatron's ``forward_backward_func``.

Megatron's loss-scaling contract (megatron-core 0.16.1 .. 0.19, ``calculate_per_token_loss=False``):
a ``loss_func`` returning the 2-tuple ``(loss, logging)`` has its loss multiplied by the CP size
and divided by the number of micro-batches (``schedules.forward_step_calc_loss``), and DDP scales
the gradients by ``1 / (DP x CP)``. Our loss is already each rank's *partial* share of the step
loss (global denominators), so the step's gradient must be the plain sum over micro-batches and
DP x CP ranks. Net: multiply by ``num_microbatches x DP`` (``megatron_loss_scale``). The MoE
auxiliary losses get Megatron's own scale (``cp / num_microbatches``, then ``1/(DP x CP)``): a mean
over micro-batches and ranks, the usual meaning of ``moe_aux_loss_coeff``.
``tests/distributed/test_megatron_model.py`` pins this: the same gradients for 1 vs 4
micro-batches and DP 1 vs 2, against a single-process autograd reference.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Iterator, List, Optional

import torch

from megatron_rl.model.cpu_modes import cpu_modes_suspended
from megatron_rl.parallel.groups import ParallelGroups
from megatron_rl.parallel.loss import ShardedMicroBatch, logprobs_entropy, sharded_policy_loss
from megatron_rl.model import routing_replay

Tensor = torch.Tensor


def megatron_loss_scale(num_microbatches: int, dp_size: int) -> float:
    """What a partial loss is multiplied by before Megatron scales it (see the module doc)."""
    return float(num_microbatches * dp_size)


@dataclass
class PolicyMicroBatch:
    """One micro-batch on this rank: model inputs (this CP rank's shard; BSHD ``[b, s]``) and the
    loss inputs as ``[B, 2C]`` views (see ``parallel.loss``). Routes are int16 ``[N, L, K]`` in
    the routers' token order (``train.routing_replay``); ``trainer_logprobs`` are the trainer's
    log-probs at the rollout's weights where a pass measured them (the mismatch metrics)."""

    tokens: Tensor
    position_ids: Tensor
    labels: Tensor
    shard: ShardedMicroBatch
    old_logprobs: Optional[Tensor]          # None: filled by the update's forward (StepPlan)
    advantages: Tensor
    ref_logprobs: Optional[Tensor] = None
    rollout_logprobs: Optional[Tensor] = None
    packed_seq_params: Any = None
    routes: Optional[Tensor] = None          # replayed in the policy's forwards
    engine_routes: Optional[Tensor] = None   # the engine's, compared with the live routers once
    trainer_logprobs: Optional[Tensor] = None


@dataclass(frozen=True)
class PolicyLoss:
    """The configured loss: registry name, its parameters and the step's denominators."""

    name: str
    params: Dict[str, Any]
    num_tokens: Tensor
    num_seqs: Tensor
    temperature: float = 1.0   # the sampling temperature: the policy the engine sampled from


def _tempered(logits: Tensor, temperature: float) -> Tensor:
    """The sampled policy's logits: vLLM samples from ``softmax(logits / T)`` and reports those
    log-probs (``logprobs_mode=processed_logprobs``), so the trainer's ratio uses the same ``T``."""
    return logits if temperature == 1.0 else logits / temperature


def _vocab_start(logits: Tensor, groups: ParallelGroups) -> int:
    return groups.tp_rank * logits.shape[-1]


def _forward_without_cpu_modes() -> bool:
    """The model's forward (most of a step's torch calls) skips the CPU function modes' per-call
    cost: megatron-core's forward hard-codes CUDA only in context parallelism's rotary split
    (``rope_utils.get_pos_emb_on_this_cp_rank``: ``pin_memory=True``, a CUDA device)."""
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_world_size() == 1


def model_forward(mb: PolicyMicroBatch, model, record_routes: bool = False,
                  replay_routes: bool = True, measure: bool = False) -> Tensor:
    """``model`` on ``mb``. The policy replays ``mb.routes`` unless ``replay_routes`` is False (the
    reference policy and the critic route their own tokens); ``record_routes`` stores the routes
    used in ``mb.routes``; ``measure`` compares the live routers with ``mb.engine_routes``
    (``routing_replay.RouteControl.agreement``)."""
    def run():
        """The model's forward on the micro-batch."""
        with cpu_modes_suspended() if _forward_without_cpu_modes() else contextlib.nullcontext():
            return model(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=None,
                         packed_seq_params=mb.packed_seq_params)

    control = routing_replay.route_control(model)
    if control is None:
        return run()
    with control.active(replay=mb.routes if replay_routes else None, record=record_routes,
                        compare=mb.engine_routes if measure and replay_routes else None):
        out = run()
        if record_routes:
            mb.routes = control.merge_recorded(mb.routes)
    return out


@cpu_modes_suspended()
def _loss_func(mb: PolicyMicroBatch, loss: PolicyLoss, groups: ParallelGroups, scale: float,
               chunk_tokens: Optional[int], logits: Tensor, *, measure: bool = False):
    lp, ent = logprobs_entropy(mb.shard, _tempered(logits, loss.temperature), mb.labels,
                               tp_group=groups.tp, vocab_start=_vocab_start(logits, groups),
                               chunk_tokens=chunk_tokens)
    if mb.old_logprobs is None:   # StepPlan.old_from_update: this forward is the rollout policy's
        mb.old_logprobs = lp.detach()
    if measure:                   # the first forward at the rollout's weights
        mb.trainer_logprobs = lp.detach()
    value, metrics = sharded_policy_loss(
        loss.name, mb.shard, logprobs=lp, old_logprobs=mb.old_logprobs, advantages=mb.advantages,
        num_tokens=loss.num_tokens, num_seqs=loss.num_seqs, ref_logprobs=mb.ref_logprobs,
        rollout_logprobs=mb.rollout_logprobs, entropy=ent, **loss.params)
    logged = {"loss": value.detach(), **{k: v.detach() for k, v in metrics.items()}}
    return value * scale, logged


def schedule_shapes(model: List, micro_batches: List[PolicyMicroBatch],
                     cp_size: int) -> Dict[str, int]:
    """Pipeline send/recv shapes: fixed when every micro-batch has the same ``[b, s]``; packed
    batches of different lengths make Megatron exchange shapes first (``variable_seq_lengths``).
    Megatron takes the *whole* sequence length and divides it by the CP size itself
    (``schedules.get_tensor_shapes``), so this rank's ``s / cp`` is multiplied back."""
    from megatron.core.utils import get_model_config

    shapes = {tuple(m.tokens.shape) for m in micro_batches}
    get_model_config(model[0]).variable_seq_lengths = len(shapes) > 1
    b, s = micro_batches[0].tokens.shape
    return {"seq_length": int(s) * cp_size, "micro_batch_size": int(b)}


def train_forward_backward(model: List, micro_batches: List[PolicyMicroBatch], loss: PolicyLoss,
                           groups: ParallelGroups, *, chunk_tokens: Optional[int] = None,
                           measure: bool = False) -> List[Dict[str, Tensor]]:
    """Forward and backward over this rank's micro-batches with Megatron's schedule (any PP);
    gradients land in the DDP buffers, finalised. Returns the per-micro-batch partial metrics
    (last pipeline stage only; sum them, then all-reduce over DP x CP). ``measure``: this is the
    first forward at the rollout's weights (no old-policy pass ran): the trainer's log-probs and
    the routers' agreement with the engine are taken from it (``model_forward``)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    n = len(micro_batches)
    scale = megatron_loss_scale(n, groups.dp_size)

    def step(data: Iterator[PolicyMicroBatch], chunk_model):
        """Megatron's forward step: the next micro-batch's output and its loss function."""
        mb = next(data)
        return model_forward(mb, chunk_model, measure=measure), partial(
            _loss_func, mb, loss, groups, scale, chunk_tokens, measure=measure)

    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(micro_batches), model=model,
        num_microbatches=n, forward_only=False,
        **schedule_shapes(model, micro_batches, groups.cp_size))


def forward_logprobs(model: List, micro_batches: List[PolicyMicroBatch], groups: ParallelGroups,
                     *, chunk_tokens: Optional[int] = None, record_routes: bool = False,
                     replay_routes: bool = True, measure: bool = False,
                     temperature: float = 1.0) -> List[Tensor]:
    """The old-policy or reference log-probs ``[B, 2C]`` of each micro-batch: forward only, no
    autograd graph, the same model code (last pipeline stage only; other stages get []).
    ``record_routes`` stores each micro-batch's expert routes in ``mb.routes`` for replay in the
    training forward; ``replay_routes=False`` lets the routers choose (the reference policy);
    ``measure``: the old-policy pass at the rollout's weights (``model_forward``)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    @cpu_modes_suspended()
    def logprob_func(mb, logits):
        """The micro-batch's log-probs (a zero loss: forward only)."""
        lp, _ = logprobs_entropy(mb.shard, _tempered(logits, temperature), mb.labels,
                                 tp_group=groups.tp, vocab_start=_vocab_start(logits, groups),
                                 chunk_tokens=chunk_tokens)
        if measure:
            mb.trainer_logprobs = lp.detach()
        return lp.sum() * 0, {"logprobs": lp.detach()}

    def step(data, chunk_model):
        """Megatron's forward step: the next micro-batch's output and its loss function."""
        mb = next(data)
        return (model_forward(mb, chunk_model, record_routes, replay_routes, measure),
                partial(logprob_func, mb))

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(micro_batches), model=model,
            num_microbatches=len(micro_batches), forward_only=True,
            **schedule_shapes(model, micro_batches, groups.cp_size))
    return [o["logprobs"] for o in out]
