"""Clip-Cov and KL-Cov ("The Entropy Mechanism of RL for Reasoning LMs", Cui et al. 2025).

Entropy collapses through the few tokens whose log-prob and advantage co-vary most. Both methods
score tokens by the centred covariance ``cov_t = (A_t - mean A) (lp_t - mean lp)`` (means over the
action tokens of the micro-batch, detached) and treat a small selection specially:
  Clip-Cov  a random ``ratio`` fraction (at least one) of the tokens with ``lb < cov < ub`` that
            the PPO clip has not already zeroed lose their gradient (as verl's ``clip_cov``);
  KL-Cov    the top ``ratio`` fraction by cov get a penalty ``coef * |lp - lp_old|``. The loss's
            weight function still applies to every token (``grpo``: the PPO clip); verl's
            ``kl_cov`` has no clip (``reinforce`` with ``weight: full`` gives that).
Both select by ranks from one sort, without host syncs.
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
    generator: Optional[torch.Generator] = None, exclude: Optional[Tensor] = None,
) -> Tensor:
    """Bool ``[B,T]``: the tokens whose gradient Clip-Cov detaches, as the reference does: a
    uniformly random subset of exactly ``min(max(floor(ratio * n_tokens), 1), n_candidates)`` of
    the candidates ``lb < cov < ub``, not counting tokens in ``exclude`` (those the PPO clip
    already zeroed). The subset is drawn by ranking random keys, without a host sync."""
    valid = mask > 0
    cand = valid & (cov > lb) & (cov < ub)
    if exclude is not None:
        cand = cand & ~exclude
    n_valid = valid.sum().to(cov.dtype)
    k = torch.minimum(torch.floor(ratio * n_valid).clamp_min(1), cand.sum().to(cov.dtype))
    u = torch.rand(cov.shape, generator=generator, dtype=cov.dtype, device=cov.device)
    keys = torch.where(cand, u, torch.full_like(u, 2.0)).flatten()   # non-candidates rank last
    return (_ranks(keys, descending=False).view_as(cov) < k) & cand


def _ranks(flat: Tensor, descending: bool) -> Tensor:
    """The rank of each element of ``flat`` in sorted order (0 = first)."""
    order = torch.argsort(flat, descending=descending)
    return torch.empty_like(order).scatter_(0, order, torch.arange(flat.numel(), device=flat.device))


def kl_cov_select(cov: Tensor, mask: Tensor, *, ratio: float) -> Tensor:
    """Bool ``[B,T]``: the ``max(floor(ratio * n_tokens), 1)`` action tokens of largest cov."""
    valid = mask > 0
    flat = torch.where(valid, cov, torch.full_like(cov, float("-inf"))).flatten()
    k = torch.floor(ratio * valid.sum().to(cov.dtype)).clamp_min(1)
    return (_ranks(flat, descending=True).view_as(cov) < k) & valid
