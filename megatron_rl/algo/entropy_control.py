"""Clip-Cov and KL-Cov ("The Entropy Mechanism of RL for Reasoning LMs", Cui et al. 2025).

Entropy collapses through the few tokens whose log-prob and advantage co-vary most. Both methods
score tokens by the centred covariance ``cov_t = (A_t - mean A) (lp_t - mean lp)`` (means over the
action tokens of the micro-batch, detached) and treat a small selection specially:
  Clip-Cov  a random ``ratio`` fraction of tokens with ``lb < cov < ub`` lose their gradient;
  KL-Cov    the top ``ratio`` fraction by cov get a penalty ``coef * |lp - lp_old|``.
Both select without host syncs: Clip-Cov by Bernoulli draws whose probability gives the same
expected count as the reference implementation's random subset; KL-Cov by ranks from one sort.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_rl.algo.masked import as_float_mask

Tensor = torch.Tensor


def centred_covariance(advantages: Tensor, logprobs: Tensor, mask: Tensor) -> Tensor:
    """``[B,T]`` per-token ``(A - mean A)(lp - mean lp)`` over action tokens; 0 off the mask."""
    m = as_float_mask(mask, logprobs)
    n = m.sum().clamp_min(1)
    a, lp = advantages.detach(), logprobs.detach()
    cov = (a - (a * m).sum() / n) * (lp - (lp * m).sum() / n)
    return cov * m


def clip_cov_select(
    cov: Tensor, mask: Tensor, *, ratio: float, lb: float, ub: float,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Bool ``[B,T]``: tokens whose gradient Clip-Cov detaches (expected count
    ``min(ratio * n_tokens, n_candidates)``)."""
    valid = mask > 0
    cand = valid & (cov > lb) & (cov < ub)
    n_valid = valid.sum().to(cov.dtype)
    n_cand = cand.sum().to(cov.dtype).clamp_min(1)
    p = (ratio * n_valid / n_cand).clamp(max=1.0)
    u = torch.rand(cov.shape, generator=generator, dtype=cov.dtype, device=cov.device)
    return cand & (u < p)


def kl_cov_select(cov: Tensor, mask: Tensor, *, ratio: float) -> Tensor:
    """Bool ``[B,T]``: the ``max(floor(ratio * n_tokens), 1)`` action tokens of largest cov."""
    valid = mask > 0
    flat = torch.where(valid, cov, torch.full_like(cov, float("-inf"))).flatten()
    order = torch.argsort(flat, descending=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(flat.numel(), device=flat.device))
    k = torch.floor(ratio * valid.sum().to(cov.dtype)).clamp_min(1)
    return (rank.view_as(cov) < k) & valid
