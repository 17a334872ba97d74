"""The policy loss on sharded inputs: CP-sharded sequences, TP-sharded vocabulary, DP ranks.

One optimizer step, on every rank:

    mbs = [prepare_micro_batch(shard, loss_mask, group_ids, groups.cp) for ...]  # lengths: 1 reduce
    num_tokens, num_seqs = step_denominators(mbs, groups.dp_cp)             # once, 1 reduce
    for mb, logits, labels in ...:
        lp, ent = logprobs_entropy(mb, logits, labels, tp_group=groups.tp, vocab_start=v0)
        adv = sharded_advantages("future_kl_grpo", mb, rewards=r, kl=mb.view(old - ref))
        loss, metrics = sharded_policy_loss("gspo", mb, logprobs=lp, ..., num_tokens, num_seqs)
        loss.backward()

The math is ``megatron_rl.algo``'s, unchanged: it runs on each rank's ``[B, 2C]`` view with
``CPSeqOps`` doing the reductions along sequences. Each rank's loss is its partial share (its
tokens over the global denominators), identical on the TP ranks of a CP/DP position; the sum over
the DP x CP ranks and micro-batches is the step's loss, and the gradients Megatron sums over DP x CP
are exactly the single-process gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from megatron_rl.algo.advantages import compute_advantages
from megatron_rl.algo.losses import policy_loss
from megatron_rl.algo.masked import whiten_moments, whiten_with_moments
from megatron_rl.parallel.collectives import Group, all_reduce_nograd
from megatron_rl.parallel.cp_layout import CPShard
from megatron_rl.parallel.seq_ops import CPSeqOps
from megatron_rl.parallel.vocab_parallel import vocab_parallel_logprobs

Tensor = torch.Tensor


@dataclass
class ShardedMicroBatch:
    """One micro-batch as this rank holds it. ``mask[B, 2C]`` (view) is 1 on action tokens;
    ``seq_lengths[B]`` the global action count of each sequence; ``group_ids[B]`` prompt ids."""

    shard: CPShard
    ops: CPSeqOps
    mask: Tensor
    seq_lengths: Tensor
    group_ids: Tensor

    def view(self, local: Tensor) -> Tensor:
        """A local per-token tensor (this rank's shard, shifted labels' coordinates) as ``[B, 2C]``."""
        return self.shard.to_view(local)


def prepare_micro_batch(
    shard: CPShard, loss_mask: Tensor, group_ids: Tensor, cp_group: Group,
    num_groups: Optional[int] = None, dtype: torch.dtype = torch.float32,
) -> ShardedMicroBatch:
    """``loss_mask``: this rank's shard of the shifted loss mask (BSHD ``[B, S/cp]``, THD ``[N]``).
    Reduces the global sequence lengths once (one ``[B]`` all-reduce over CP)."""
    ops = CPSeqOps(shard, cp_group, num_groups)
    mask = shard.to_view(loss_mask.to(dtype))
    return ShardedMicroBatch(shard, ops, mask, ops.seq_len(mask, dtype), group_ids)


def step_denominators(
    micro_batches: Sequence[ShardedMicroBatch], dp_cp_group: Group,
) -> Tuple[Tensor, Tensor]:
    """Global ``(num_tokens, num_seqs)`` of the optimizer step: action tokens and sequences with at
    least one action token, over every micro-batch of every DP x CP rank. One all-reduce of two
    float64 scalars; call it once per step, before the first micro-batch."""
    if not micro_batches:
        raise ValueError("step_denominators needs this rank's micro-batches (an empty list "
                         "would leave its peers waiting in the all-reduce)")
    dev = micro_batches[0].mask.device
    local = torch.zeros(2, dtype=torch.float64, device=dev)
    for mb in micro_batches:
        local[0] += mb.mask.double().sum()
        if mb.shard.cp_rank == 0:  # every CP rank holds every sequence: count each once
            local[1] += (mb.seq_lengths > 0).double().sum()
    tokens, seqs = all_reduce_nograd(local, dp_cp_group)
    return tokens, seqs


def logprobs_entropy(
    mb: ShardedMicroBatch, logits: Tensor, labels: Tensor, *, tp_group: Group = None,
    vocab_start: int = 0, chunk_tokens: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """Log-probs and entropy ``[B, 2C]`` from this rank's logits ``labels.shape + (Vs,)`` and
    its shard of the shifted labels (BSHD ``[B, S/cp]``, THD ``[N]``)."""
    lp, ent = vocab_parallel_logprobs(logits, labels, tp_group=tp_group, vocab_start=vocab_start,
                                      chunk_tokens=chunk_tokens)
    return mb.view(lp), mb.view(ent)


def sharded_advantages(name: str, mb: ShardedMicroBatch, *, rewards: Tensor,
                       kl: Optional[Tensor] = None, values: Optional[Tensor] = None,
                       **params) -> Tensor:
    """``compute_advantages`` on the view: ``rewards[B]``, ``kl``/``values`` ``[B, 2C]``."""
    return compute_advantages(name, rewards=rewards, mask=mb.mask, group_ids=mb.group_ids, kl=kl,
                              values=values, ops=mb.ops, **params)


def step_whiten(advantages: Sequence[Tensor], micro_batches: Sequence[ShardedMicroBatch],
                dp_cp_group: Group) -> list:
    """Whiten every micro-batch's advantages ``[B, 2C]`` with the mean and variance over all
    action tokens of the step: every micro-batch of every DP x CP rank (each token lives on one CP
    rank; TP ranks hold copies and reduce in their own DP x CP group). One all-reduce of three
    float64 numbers, no autograd (advantages are constants of the loss)."""
    if not micro_batches:
        raise ValueError("step_whiten needs this rank's micro-batches (an empty list would leave "
                         "its peers waiting in the all-reduce)")
    local = sum(whiten_moments(a, mb.mask) for a, mb in zip(advantages, micro_batches))
    total = all_reduce_nograd(local, dp_cp_group)
    return [whiten_with_moments(a, mb.mask, total) for a, mb in zip(advantages, micro_batches)]


def sharded_policy_loss(name: str, mb: ShardedMicroBatch, **kwargs) -> Tuple[Tensor, Dict[str, Tensor]]:
    """``policy_loss`` on the view: this rank's partial loss and partial metrics. Takes the same
    keyword arguments (``logprobs``, ``old_logprobs``, ``advantages``, ``num_tokens``,
    ``num_seqs``, ... as ``[B, 2C]`` tensors) less ``mask``/``seq_lengths``/``ops``."""
    return policy_loss(name, mask=mb.mask, seq_lengths=mb.seq_lengths, ops=mb.ops, **kwargs)
