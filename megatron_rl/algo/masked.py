"""Masked reductions over ``[B,T]`` tensors: per-sequence sums, suffix sums, group statistics.

Legend: ``B`` sequences, ``T`` padded positions, ``mask[B,T]`` in {0,1} (float or bool).
Group statistics take ``group_ids[B]``, integer ids in ``[0, B)`` (the prompt index of each
response); buffers are sized ``B`` so no host sync is needed to count groups.
Sums that run along a sequence accumulate in float64 and cast back: a suffix sum over 32k tokens in
fp32 loses the low bits the future-KL advantage depends on.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def as_float_mask(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(dtype=like.dtype if like.is_floating_point() else torch.float32)


def seq_sum(x: Tensor, mask: Tensor) -> Tensor:
    """``[B,T] -> [B]``: sum of ``x`` over the masked positions of each sequence."""
    return (x * as_float_mask(mask, x)).sum(-1)


def seq_len(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[B,T] -> [B]``: number of action tokens of each sequence (float, for division)."""
    return mask.to(dtype).sum(-1)


def suffix_sum(x: Tensor, mask: Tensor) -> Tensor:
    """``[B,T] -> [B,T]``: ``out[b, j] = sum_{k >= j} mask[b,k] * x[b,k]`` (float64 accumulation).

    Defined at every position, masked or not; callers multiply by the mask where they need to.
    """
    acc = (x * as_float_mask(mask, x)).double()
    return acc.flip(-1).cumsum(-1).flip(-1).to(x.dtype)


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
    v = as_float_mask(valid, x)
    xd, vd = (x * v).double(), v.double()
    n = group_sum(vd, group_ids)
    mean = group_sum(xd, group_ids) / n.clamp_min(1)
    sq = group_sum(((xd - mean) * vd) ** 2, group_ids)
    dof = (n - 1) if unbiased else n
    var = torch.where(n > 1, sq / dof.clamp_min(1), torch.zeros_like(sq))
    return mean.to(x.dtype), var.sqrt().to(x.dtype), n.to(x.dtype)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8, shift_mean: bool = True) -> Tensor:
    """Whiten ``x`` with the mean and (biased) variance over all masked positions of the batch."""
    m = as_float_mask(mask, x)
    n = m.sum().clamp_min(1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m
