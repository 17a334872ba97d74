"""Masked reductions over ``[B,T]`` tensors: per-sequence sums, suffix sums, group statistics.

Legend: ``B`` sequences, ``T`` padded positions, ``mask[B,T]`` in {0,1} (float or bool).
Group statistics take ``group_ids[B]``, integer ids in ``[0, B)`` (the prompt index of each
response); buffers are sized ``B`` so no host sync is needed to count groups.
Sums that run along a sequence accumulate in float64 and cast back: a suffix sum over 32k tokens in
fp32 loses the low bits the future-KL advantage depends on.

Everything that runs *along* a sequence or across the whole batch goes through a ``SeqOps`` object
(``LOCAL`` here: whole sequences in one process). ``megatron_rl.parallel.seq_ops.CPSeqOps`` offers
the same methods for sequences sharded over context-parallel ranks, so the estimators and losses
run unchanged on shards; this module itself never communicates.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch

Tensor = torch.Tensor


def as_float_mask(mask: Tensor, like: Tensor) -> Tensor:
    """``mask`` in ``like``'s floating dtype (float32 when ``like`` is not floating)."""
    return mask.to(dtype=like.dtype if like.is_floating_point() else torch.float32)


def seq_sum(x: Tensor, mask: Tensor) -> Tensor:
    """``[B,T] -> [B]``: sum of ``x`` over the masked positions of each sequence."""
    return (x * as_float_mask(mask, x)).sum(-1)


def seq_max(x: Tensor, mask: Tensor) -> Tensor:
    """``[B,T] -> [B]``: the largest ``x`` over each sequence's masked positions (``-inf`` for a
    sequence with none)."""
    masked = torch.where(as_float_mask(mask, x) > 0, x, torch.full_like(x, float("-inf")))
    return torch.cat([masked, masked.new_full((x.shape[0], 1), float("-inf"))], -1).amax(-1)


def seq_len(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[B,T] -> [B]``: number of action tokens of each sequence (float, for division)."""
    return mask.to(dtype).sum(-1)


def suffix_sum(x: Tensor, mask: Tensor) -> Tensor:
    """``[B,T] -> [B,T]``: ``out[b, j] = sum_{k >= j} mask[b,k] * x[b,k]`` (float64 accumulation).

    Defined at every position, masked or not; callers multiply by the mask where they need to.
    """
    acc = (x * as_float_mask(mask, x)).double()
    return acc.flip(-1).cumsum(-1).flip(-1).to(x.dtype)


def linear_suffix_scan(a: Tensor, b: Tensor, exclusive: bool = False) -> Tensor:
    """``[B,T] -> [B,T]``: ``y[t] = a[t] * y[t+1] + b[t]``, with ``y[T] = 0``;
    ``exclusive`` returns ``y[t+1]`` at ``t`` instead. float64 accumulation.

    Discounted returns that skip environment tokens are this scan with ``a = gamma`` on action
    tokens and 1 elsewhere (a non-action token passes the return through); GAE's next value and
    its advantage recursion are two more. A sequential scan: a loop over ``T``."""
    a64, b64 = a.double(), b.double()
    y = a64.new_zeros(a.shape[0])
    out = torch.empty_like(a64)
    for t in range(a.shape[1] - 1, -1, -1):
        if exclusive:
            out[:, t] = y
        y = a64[:, t] * y + b64[:, t]
        if not exclusive:
            out[:, t] = y
    return out.to(b.dtype)


def group_sum(x: Tensor, group_ids: Tensor) -> Tensor:
    """``[B,...] -> [B,...]``: each row replaced by the sum of the rows of its group."""
    buf = torch.zeros_like(x).index_add_(0, group_ids, x)
    return buf.index_select(0, group_ids)


def group_mean_std(
    x: Tensor, valid: Tensor, group_ids: Tensor, unbiased: bool = True
) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean, std and count of ``x`` over the valid members of each row's group (per column).

    ``x, valid`` are ``[B]`` or ``[B,T]``; with ``[B,T]`` the statistics are per position, over
    the responses of the group that are valid at that position. Returns tensors shaped like ``x``.
    ``unbiased`` uses Bessel's correction (what ``torch.std`` does; verl and TRL use it). Where a
    group has a single valid member the std is reported as 0 and the count as 1, so callers can
    zero those advantages.
    """
    return pooled_mean_std(x, valid, lambda t: group_sum(t, group_ids), unbiased)


def pooled_mean_std(
    x: Tensor, valid: Tensor, pool: Callable[[Tensor], Tensor], unbiased: bool = True
) -> Tuple[Tensor, Tensor, Tensor]:
    """``group_mean_std`` with the pooling left open: ``pool(t)`` must return, for every element,
    the sum of ``t`` over the elements it is pooled with (itself included). Two passes (mean, then
    centred squares) in float64, so near-constant groups keep their small variance."""
    v = as_float_mask(valid, x)
    xd, vd = (x * v).double(), v.double()
    n = pool(vd)
    mean = pool(xd) / n.clamp_min(1)
    sq = pool(((xd - mean) * vd) ** 2)
    dof = (n - 1) if unbiased else n
    var = torch.where(n > 1, sq / dof.clamp_min(1), torch.zeros_like(sq))
    return mean.to(x.dtype), var.sqrt().to(x.dtype), n.to(x.dtype)


def action_index(mask: Tensor, ops: "SeqOps" = None) -> Tensor:
    """``[B,T]`` long: ``j`` (0-based) on the ``j``-th action token of each sequence, counted over
    action tokens only, so environment tokens between turns do not shift it (0 off the mask).
    Written as ``H - (actions at or after t)`` so that it needs only the sequence ops' length and
    suffix sum, which also exist for sequences sharded over CP ranks."""
    ops = ops or LOCAL
    m = as_float_mask(mask, torch.empty((), dtype=torch.float64))
    idx = ops.seq_len(mask, torch.float64)[:, None] - ops.suffix_sum(m, m)
    return (idx * m).round().long()


def keyed_pool(keys: Tensor, size: int, reduce: Callable[[Tensor], Tensor] = lambda t: t):
    """A ``pool`` for ``pooled_mean_std``: elements with the same ``keys`` value (``[B,T]`` long in
    ``[0, size)``) are pooled through a ``[size]`` buffer; ``reduce`` sums that buffer over ranks
    holding other shards of the same sequences (identity for whole sequences)."""
    flat = keys.flatten()

    def pool(t: Tensor) -> Tensor:
        """Each element replaced by the sum over its key's pool."""
        buf = t.new_zeros(size).index_add_(0, flat, t.flatten())
        return reduce(buf).index_select(0, flat).view_as(t)

    return pool


def action_group_stats(x: Tensor, valid: Tensor, group_ids: Tensor, *, max_actions: int,
                       num_groups: int, unbiased: bool = True, ops: "SeqOps" = None,
                       reduce: Callable[[Tensor], Tensor] = lambda t: t
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean, std and count of ``x`` per (group, action index ``j``): the ``j``-th action of every
    response of a group is pooled wherever it sits in the padded sequence (``action_index``);
    padding and environment tokens (``valid`` 0) take no part. ``max_actions`` bounds ``H`` and
    ``num_groups`` the group ids (host ints: the buffer is ``[num_groups * max_actions]``)."""
    j = action_index(valid, ops).clamp(0, max(max_actions - 1, 0))
    keys = group_ids[:, None].long() * max_actions + j
    return pooled_mean_std(x, valid, keyed_pool(keys, num_groups * max_actions, reduce), unbiased)


def masked_whiten(
    x: Tensor, mask: Tensor, eps: float = 1e-8, shift_mean: bool = True, ops: "SeqOps" = None
) -> Tensor:
    """Whiten ``x`` with the mean and (biased) variance over all masked positions of the batch."""
    ops = ops or LOCAL
    m = as_float_mask(mask, x)
    n = ops.batch_sum(m).clamp_min(1)
    mean = ops.batch_sum(x * m) / n
    var = ops.batch_sum(((x - mean) * m) ** 2) / n
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def whiten_moments(x: Tensor, mask: Tensor) -> Tensor:
    """``[3]`` float64 ``(count, sum, sum of squares)`` of ``x`` over masked positions: summed over
    micro-batches and ranks, they give ``masked_whiten``'s mean and variance for the whole lot."""
    m = as_float_mask(mask, x).double()
    xd = x.detach().double() * m
    return torch.stack([m.sum(), xd.sum(), (xd * xd).sum()])


def whiten_with_moments(x: Tensor, mask: Tensor, moments: Tensor, eps: float = 1e-8) -> Tensor:
    """``masked_whiten`` with the mean and (biased) variance of the summed ``moments``."""
    n = moments[0].clamp_min(1)
    mean = moments[1] / n
    var = (moments[2] / n - mean * mean).clamp_min(0)
    out = (x.double() - mean) * torch.rsqrt(var + eps)
    return (out * as_float_mask(mask, out)).to(x.dtype)


class SeqOps:
    """Reductions along sequences and across the batch, on whole sequences held by one process.

    The algo functions call these instead of summing along ``dim=-1`` themselves; a sharded
    implementation (``megatron_rl.parallel.seq_ops.CPSeqOps``) overrides every method and sets
    ``sharded = True``. All take and return ``[B,T]``/``[B]`` tensors as documented above.
    """

    sharded = False
    cp_size = 1

    def seq_sum(self, x: Tensor, mask: Tensor) -> Tensor:
        """``[B,T] -> [B]`` masked sum of each sequence."""
        return seq_sum(x, mask)

    def seq_max(self, x: Tensor, mask: Tensor) -> Tensor:
        """``[B,T] -> [B]`` masked maximum of each sequence (a statistic: no gradient)."""
        return seq_max(x.detach(), mask)

    def seq_len(self, mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[B,T] -> [B]`` action-token count of each sequence."""
        return seq_len(mask, dtype)

    def suffix_sum(self, x: Tensor, mask: Tensor) -> Tensor:
        """``[B,T] -> [B,T]`` masked suffix sum along each sequence."""
        return suffix_sum(x, mask)

    def position_group_stats(
        self, x: Tensor, valid: Tensor, group_ids: Tensor, unbiased: bool = True
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Per-action-position ``group_mean_std`` of ``x[B,T]``: the ``j``-th action token
        (``action_index`` over ``valid``) of every response in a group is pooled, not the ``j``-th
        padded column. Statistics for advantages: callers treat them as constants."""
        B, T = x.shape
        return action_group_stats(x, valid, group_ids, max_actions=T, num_groups=B,
                                  unbiased=unbiased, ops=self)

    def batch_sum(self, x: Tensor) -> Tensor:
        """Sum of every element of ``x`` over the whole batch (scalar)."""
        return x.sum()

    def linear_suffix_scan(self, a: Tensor, b: Tensor, exclusive: bool = False) -> Tensor:
        """``[B,T] -> [B,T]``: ``linear_suffix_scan`` along each whole sequence (statistics for
        advantages: no gradient)."""
        return linear_suffix_scan(a, b, exclusive=exclusive)



LOCAL = SeqOps()


class ShardedProbe(SeqOps):
    """Local arithmetic that reports itself sharded over ``cp_size`` ranks: a config check runs
    the algorithm once with it and meets, at load time, the errors a context-parallel run would."""

    sharded = True

    def __init__(self, cp_size: int):
        self.cp_size = cp_size
