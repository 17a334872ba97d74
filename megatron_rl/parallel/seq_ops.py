"""Reductions along sequences sharded over context-parallel ranks (``SeqOps`` for ``CPShard``).

Every method takes the ``[B, 2C]`` view of ``CPShard`` and exchanges only per-sequence or
per-chunk scalars, never per-token tensors:

  seq_sum        local row sums, one all-reduce of ``[B]``
  seq_max        local row maxima, one MAX all-reduce of ``[B]`` (a statistic: no gradient)
  suffix_sum     local suffix sums inside each held chunk, one all-reduce of the ``[B, 2cp]``
                 chunk totals, plus the exclusive suffix over later chunks
  position stats pooled by (group, action index); aligned single-turn layouts (BSHD, or THD
                 with group-aligned lengths, and no environment tokens): local, no traffic;
                 otherwise a scatter-add into a ``[num_groups, S_max]`` buffer, all-reduced
  batch_sum      local sum, one scalar all-reduce
  linear_suffix_scan  ``y[t] = a[t] y[t+1] + b[t]`` (discounted returns, GAE): each held chunk
                 scanned locally from a zero carry, with its product of ``a``; one all-reduce
                 of the ``[B, 2cp]`` heads and products; each chunk's carry composed from the
                 later chunks' (``2cp`` steps on ``[B]``), then applied
Accumulation is float64 (a 32k-token suffix sum in fp32 loses the bits the future-KL advantage
needs). The per-rank loss is a partial loss (each rank holds other tokens), so the differentiable
reductions use ``all_reduce_partial`` (summed backward); statistics use ``all_reduce_nograd``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

import torch.distributed as dist

from megatron_rl.algo.masked import (SeqOps, action_group_stats, as_float_mask, group_mean_std,
                                     linear_suffix_scan, seq_max)
from megatron_rl.parallel.collectives import Group, all_reduce_nograd, all_reduce_partial
from megatron_rl.parallel.cp_layout import CPShard

Tensor = torch.Tensor


class CPSeqOps(SeqOps):
    """``SeqOps`` over the CP group ``cp_group`` for the sequences of ``shard``.

    ``num_groups`` (a host int from the batch builder; group ids must be below it) sizes the
    per-position buffer of unaligned THD batches; it defaults to ``B``.
    """

    sharded = True

    def __init__(self, shard: CPShard, cp_group: Group, num_groups: Optional[int] = None):
        self.shard = shard
        self.cp_size = shard.cp_size
        self.group = cp_group
        self.num_groups = shard.num_seqs if num_groups is None else num_groups
        self._len_of: Optional[Tensor] = None
        self._len: Optional[Tensor] = None

    def seq_sum(self, x: Tensor, mask: Tensor) -> Tensor:
        """Local row sums, all-reduced over CP (summed backward: partial losses)."""
        local = (x * as_float_mask(mask, x)).double().sum(-1)
        return all_reduce_partial(local, self.group).to(x.dtype)

    def seq_max(self, x: Tensor, mask: Tensor) -> Tensor:
        """Local row maxima, MAX-reduced over CP (a statistic: no gradient)."""
        return all_reduce_nograd(seq_max(x.detach(), mask), self.group, dist.ReduceOp.MAX)

    def seq_len(self, mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        # the micro-batch's mask is asked for by the estimator, the ratio and the aggregation:
        # reduce it once
        """The global action count of each sequence, reduced once per mask."""
        if mask is not self._len_of:
            self._len_of = mask
            self._len = all_reduce_nograd(mask.double().sum(-1), self.group)
        return self._len.to(dtype)

    def suffix_sum(self, x: Tensor, mask: Tensor) -> Tensor:
        """Suffix sums along whole sequences from their CP shards (chunk totals exchanged)."""
        B, W = x.shape
        C, cp = W // 2, self.shard.cp_size
        acc = (x * as_float_mask(mask, x)).double().view(B, 2, C)
        local = acc.flip(-1).cumsum(-1).flip(-1)                          # within each held chunk
        ids = torch.tensor(self.shard.chunks, device=x.device)
        heads = local[:, :, 0] if C else acc.new_zeros(B, 2)             # each held chunk's total
        totals = acc.new_zeros(B, 2 * cp).index_add(1, ids, heads)       # [B, 2cp], own chunks only
        totals = all_reduce_partial(totals, self.group)                   # every chunk's total
        later = totals.flip(-1).cumsum(-1).flip(-1) - totals              # exclusive suffix
        out = local + later.index_select(1, ids)[:, :, None]
        return out.view(B, W).to(x.dtype)

    def position_group_stats(
        self, x: Tensor, valid: Tensor, group_ids: Tensor, unbiased: bool = True
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Pooled by (group, action index ``j``). ``positions_aligned`` shards (every group's
        actions contiguous, starting at one position, and in the same view columns: the batch
        builder checks this on the host) pool by view column, locally; otherwise the ``j``-th
        actions meet in a ``[num_groups * max_len]`` buffer all-reduced over CP."""
        with torch.no_grad():
            if self.shard.positions_aligned:
                return group_mean_std(x, valid, group_ids, unbiased)
            return action_group_stats(x, valid, group_ids, max_actions=self.shard.max_len,
                                      num_groups=self.num_groups, unbiased=unbiased, ops=self,
                                      reduce=lambda buf: all_reduce_nograd(buf, self.group))

    def batch_sum(self, x: Tensor) -> Tensor:
        """The sum over every rank's shard (summed backward)."""
        return all_reduce_partial(x.double().sum(), self.group).to(x.dtype)

    def linear_suffix_scan(self, a: Tensor, b: Tensor, exclusive: bool = False) -> Tensor:
        """The scan over whole sequences from their CP shards. A chunk's values are
        ``y = y_local + P * carry``, ``P[t]`` the product of ``a`` from ``t`` to the chunk's end and
        ``carry`` the scan's value at the next chunk's start; only per-chunk heads travel.
        Statistics for advantages: no gradient (``all_reduce_nograd``)."""
        B, W = a.shape
        C, cp = W // 2, self.shard.cp_size
        with torch.no_grad():
            a64, b64 = a.double().view(B * 2, C), b.double().view(B * 2, C)
            y_local = linear_suffix_scan(a64, b64).view(B, 2, C)
            prod = a64.flip(-1).cumprod(-1).flip(-1).view(B, 2, C)   # a[t] * ... * a[chunk end]
            ids = torch.tensor(self.shard.chunks, device=a.device)
            heads = a64.new_zeros(2, B, 2 * cp)
            if C:
                heads[0].index_add_(1, ids, y_local[:, :, 0])
                heads[1].index_add_(1, ids, prod[:, :, 0])
            heads = all_reduce_nograd(heads, self.group)
            carry = a64.new_zeros(B, 2 * cp + 1)        # carry[:, c]: y at chunk c's start
            for c in range(2 * cp - 1, -1, -1):
                carry[:, c] = heads[0][:, c] + heads[1][:, c] * carry[:, c + 1]
            after = carry.index_select(1, ids + 1)       # [B, 2]: y just past each held chunk
            y = y_local + prod * after[:, :, None]
            if exclusive:   # y[t + 1]: shift left inside the chunk, the chunk's carry at its end
                y = torch.cat([y[:, :, 1:], after[:, :, None]], dim=-1)
        return y.view(B, W).to(b.dtype)
