"""Reductions along sequences sharded over context-parallel ranks (``SeqOps`` for ``CPShard``).

Every method takes the ``[B, 2C]`` view of ``CPShard`` and exchanges only per-sequence or
per-chunk scalars, never per-token tensors:

  seq_sum        local row sums, one all-reduce of ``[B]``
  suffix_sum     local suffix sums inside each held chunk, one all-reduce of the ``[B, 2cp]``
                 chunk totals, plus the exclusive suffix over later chunks
  position stats pooled by (group, action index); aligned single-turn layouts (BSHD, or THD
                 with group-aligned lengths, and no environment tokens): local, no traffic;
                 otherwise a scatter-add into a ``[num_groups, S_max]`` buffer, all-reduced
  batch_sum      local sum, one scalar all-reduce
Accumulation is float64 (a 32k-token suffix sum in fp32 loses the bits the future-KL advantage
needs). The per-rank loss is a partial loss (each rank holds other tokens), so the differentiable
reductions use ``all_reduce_partial`` (summed backward); statistics use ``all_reduce_nograd``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_rl.algo.masked import SeqOps, action_group_stats, as_float_mask, group_mean_std
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
        local = (x * as_float_mask(mask, x)).double().sum(-1)
        return all_reduce_partial(local, self.group).to(x.dtype)

    def seq_len(self, mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        # the micro-batch's mask is asked for by the estimator, the ratio and the aggregation:
        # reduce it once
        if mask is not self._len_of:
            self._len_of = mask
            self._len = all_reduce_nograd(mask.double().sum(-1), self.group)
        return self._len.to(dtype)

    def suffix_sum(self, x: Tensor, mask: Tensor) -> Tensor:
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
        return all_reduce_partial(x.double().sum(), self.group).to(x.dtype)
