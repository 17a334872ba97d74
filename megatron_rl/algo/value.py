"""The critic's loss and diagnostics, on ``[B,T]`` tensors like the policy loss (PPO with GAE).

``V`` the critic's values, ``V_old`` those of the rollout-time critic, ``G`` the returns (GAE
advantages plus ``V_old``), all on action tokens:

  value loss   0.5 * max((V - G)^2, (clip(V, V_old - c, V_old + c) - G)^2)     (PPO's value clip;
               ``clip=None``: 0.5 * (V - G)^2)
aggregated like the policy loss (``losses.aggregate_tokens``: the same aggregations and global
denominators, so micro-batch losses add up to the update's). Metrics are partial sums over
``num_tokens`` too: ``value_loss``, ``value_clip_frac`` (tokens where the clipped term is the
larger), ``value_mean``, ``return_mean``. Explained variance is not a sum; ``ev_moments`` gives
the additive pieces and ``explained_variance_from_moments`` the value, ``1 - Var(G - V) / Var(G)``
(biased variances, as numpy's ``var``).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from megatron_rl.algo.losses import aggregate_tokens
from megatron_rl.algo.masked import LOCAL, SeqOps, as_float_mask

Tensor = torch.Tensor


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, num_tokens, num_seqs,
    clip: Optional[float] = None, agg: str = "token-mean", norm_constant: float = 1.0,
    seq_lengths: Optional[Tensor] = None, ops: SeqOps = LOCAL,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """This micro-batch's share of the critic loss and its partial metrics (see module doc)."""
    if clip is not None and clip <= 0:
        raise ValueError(f"value clip must be positive (or None for no clip); got {clip}")
    m = as_float_mask(mask, values)
    g = returns.detach()
    unclipped = (values - g).square()
    if clip is None:
        per_token, clipped = unclipped, torch.zeros_like(m, dtype=torch.bool)
    else:
        v_old = old_values.detach()
        bounded = v_old + (values - v_old).clamp(-clip, clip)
        other = (bounded - g).square()
        per_token = torch.maximum(unclipped, other)
        clipped = other > unclipped
    loss = 0.5 * aggregate_tokens(per_token, mask, agg, num_tokens, num_seqs, norm_constant,
                                  seq_lengths, ops)
    metrics = {"value_loss": loss.detach(),
               "value_clip_frac": (clipped.to(m.dtype) * m).sum() / num_tokens,
               "value_mean": (values.detach() * m).sum() / num_tokens,
               "return_mean": (g * m).sum() / num_tokens}
    return loss, metrics


def ev_moments(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``[5]`` float64 ``(n, sum G, sum G^2, sum (G - V), sum (G - V)^2)`` over action tokens:
    summed over micro-batches and ranks they give the explained variance of the whole step."""
    m = as_float_mask(mask, values).double()
    g = returns.detach().double() * m
    r = (returns.detach().double() - values.detach().double()) * m
    return torch.stack([m.sum(), g.sum(), (g * g).sum(), r.sum(), (r * r).sum()])


def explained_variance_from_moments(moments: Tensor) -> Tensor:
    """``1 - Var(G - V) / Var(G)``; NaN when the returns do not vary (nothing to explain)."""
    n = moments[0].clamp_min(1)
    var_g = moments[2] / n - (moments[1] / n) ** 2
    var_r = moments[4] / n - (moments[3] / n) ** 2
    return torch.where(var_g > 0, 1 - var_r / var_g.clamp_min(1e-300),
                       torch.full_like(var_g, float("nan")))


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``explained_variance_from_moments`` of one batch."""
    return explained_variance_from_moments(ev_moments(values, returns, mask))
