"""Weight functions ``w(rho)`` of the REINFORCE-form loss ``-sum sg(w) * A * lp / normaliser``.

Each takes ``ratio[B,T]`` (values only; it is detached) and ``advantages[B,T]`` and returns
``Weights(w, clipped_low, clipped_high)``: the weight and where a clip zeroed the gradient below
``1 - eps_low`` / above ``1 + eps_high`` (for the clip-fraction metrics).

  ppo_clip    w = rho, except 0 where (rho - clip(rho, 1-eps_low, 1+eps_high)) * A > 0; with a
              dual clip c, also 0 where A < 0 and rho > c. Same gradient as PPO's
              min(rho A, clip(rho) A) (and its dual-clip max with c A).
  upper_clip  w = min(rho, 1 + eps)
  power       w = rho^q  (q = 0: no IS, q = 1: full IS); ``none`` and ``full`` are its endpoints.
Truncated IS for the train/inference mismatch is separate (``truncated_is``): it multiplies
whatever weight the loss uses.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from megatron_rl.algo.masked import LOCAL, SeqOps
from megatron_rl.algo.ratios import log_ratio
from megatron_rl.algo.registry import Registry

Tensor = torch.Tensor

WEIGHT_FUNCTIONS = Registry("weight function")


class Weights(NamedTuple):
    """A policy-gradient weight ``[B,T]`` and the tokens its clip cut below and above."""
    w: Tensor
    clipped_low: Tensor
    clipped_high: Tensor
    # the ratio factor of the surrogate's VALUE as verl / TRL log it: ``clip(rho)`` where a clip
    # binds (``w`` is 0 there: same gradient, different value); ``w`` for unclipped weights
    surrogate: Optional[Tensor] = None


def _no_clip(ratio: Tensor) -> Tensor:
    return torch.zeros_like(ratio, dtype=torch.bool)


@WEIGHT_FUNCTIONS.register("ppo_clip")
def ppo_clip(
    ratio: Tensor, advantages: Tensor, *,
    eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: Optional[float] = None,
) -> Weights:
    """PPO's clipped surrogate in REINFORCE form; ``eps_high > eps_low`` is DAPO's clip-higher."""
    rho = ratio.detach()
    high = (rho > 1 + eps_high) & (advantages > 0)
    low = (rho < 1 - eps_low) & (advantages < 0)
    if dual_clip is not None:
        if dual_clip <= 1 + eps_high:
            raise ValueError(f"dual_clip must exceed 1 + eps_high = {1 + eps_high}, got {dual_clip}")
        dual = (rho > dual_clip) & (advantages < 0)
        high = high | dual
    value = torch.where(low, torch.full_like(rho, 1 - eps_low), rho)
    value = torch.where(high & (advantages > 0), torch.full_like(rho, 1 + eps_high), value)
    if dual_clip is not None:
        value = torch.where(dual, torch.full_like(rho, dual_clip), value)
    return Weights(torch.where(low | high, torch.zeros_like(rho), rho), low, high, value)


@WEIGHT_FUNCTIONS.register("upper_clip")
def upper_clip(ratio: Tensor, advantages: Tensor, *, eps: float = 0.2) -> Weights:
    """``min(rho, 1 + eps)`` whatever the sign of A: bounded variance, gradient never dropped."""
    rho = ratio.detach()
    return Weights(rho.clamp(max=1 + eps), _no_clip(rho), rho > 1 + eps)


@WEIGHT_FUNCTIONS.register("power")
def power(ratio: Tensor, advantages: Tensor, *, q: float = 1.0) -> Weights:
    """``rho^q``: interpolates between no importance sampling (q=0) and full IS (q=1)."""
    rho = ratio.detach()
    return Weights(rho.pow(q), _no_clip(rho), _no_clip(rho))


@WEIGHT_FUNCTIONS.register("none")
def none(ratio: Tensor, advantages: Tensor) -> Weights:
    """Weight 1 everywhere (the plain on-policy gradient): no clip."""
    rho = ratio.detach()
    return Weights(torch.ones_like(rho), _no_clip(rho), _no_clip(rho))


@WEIGHT_FUNCTIONS.register("full")
def full(ratio: Tensor, advantages: Tensor) -> Weights:
    """The detached ratio itself as the weight (full importance sampling): no clip."""
    rho = ratio.detach()
    return Weights(rho, _no_clip(rho), _no_clip(rho))


class TruncatedIS(NamedTuple):
    """A truncated importance weight and the tokens whose ratio the cap cut."""
    w: Tensor          # [B,T] multiplier for the policy-gradient weight
    capped: Tensor     # [B,T] bool: tokens whose ratio exceeded the cap


def truncated_is(
    old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *,
    cap: float = 2.0, mode: str = "truncate", level: str = "token",
    lengths: Optional[Tensor] = None, ops: SeqOps = LOCAL,
) -> TruncatedIS:
    """Correction for the mismatch between the trainer's and the rollout engine's log-probs.

    ``rho = exp(old - rollout)`` per token (``level="token"``) or its geometric mean over the
    response (``level="sequence"``). ``mode="truncate"`` (TIS) uses ``min(rho, cap)``;
    ``mode="mask"`` drops tokens (sequences) with ``rho > cap``, keeping the rest at weight 1.
    ``lengths``/``ops`` as in ``log_ratio``.
    """
    if mode not in ("truncate", "mask"):
        raise ValueError(f"truncated_is mode must be 'truncate' or 'mask', got {mode!r}")
    if level not in ("token", "sequence"):
        raise ValueError(f"truncated_is level must be 'token' or 'sequence', got {level!r}")
    with torch.no_grad():
        log_rho = log_ratio(level, old_logprobs, rollout_logprobs, mask, lengths, ops)
        rho = log_rho.exp()
        capped = (rho > cap) & (mask > 0)
        if mode == "truncate":
            w = rho.clamp(max=cap)
        else:
            w = (~capped).to(rho.dtype)
    return TruncatedIS(w, capped)
