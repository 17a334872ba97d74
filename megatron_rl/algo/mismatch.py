"""Corrections for the train/inference mismatch: the engine sampled from ``pi_roll`` (its own
log-probs ``lp_roll``), the trainer's old-policy pass computes ``lp_old`` for the same weights,
and the two differ (kernels, precision, routing). Each correction is a per-token multiplier of
the policy-gradient weight, from ``rho = exp(lp_old - lp_roll)`` on action tokens:

  tis     min(rho, cap) per token (or, ``tis_level="sequence"``, of the sequence's geometric mean;
          ``tis_mode="mask"`` drops instead of capping: ``weights.truncated_is``)
  icepop  keep a token only if ``low <= rho <= high`` (a two-sided token mask)
  mis     keep a whole sequence only if ``low <= exp(mean_k log rho_k) <= high`` (its geometric
          mean ratio over the response's action tokens)
  tr      trust-region masking: drop a sequence whose largest per-token KL exceeds ``max_kl``,
          the per-token KL being k3 of ``pi_roll`` against ``pi_old`` (``rho - 1 - log rho``, an
          estimate of KL(pi_roll || pi_old) from the engine's samples, >= 0)

They multiply (a token survives every mask; the TIS cap scales what survives). ``mismatch_gap``
gives the per-token gap itself (k1 and k3 of KL(pi_roll || pi_old)) for the metrics.
Legend: ``B`` sequences, ``T`` positions, ``mask[B,T]`` 1 on action tokens. No gradients: the
inputs are log-probs of fixed policies.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Sequence

import torch

from megatron_rl.algo.masked import LOCAL, SeqOps, as_float_mask
from megatron_rl.algo.ratios import log_ratio
from megatron_rl.algo.weights import truncated_is

Tensor = torch.Tensor
MAX_LOG_RHO = 20.0   # exp(20): a token the engine nearly never samples must not overflow to inf


class Correction(NamedTuple):
    """``w[B,T]``: the multiplier (1 where nothing applies); ``flags``: ``[B,T]`` bool per
    correction that ran, True on the action tokens it capped or masked (for ``*_frac`` metrics)."""

    w: Tensor
    flags: Dict[str, Tensor]


def _bounds(name: str, pair: Optional[Sequence[float]]):
    if pair is None:
        return None
    if len(pair) != 2 or not 0.0 <= float(pair[0]) <= 1.0 <= float(pair[1]):
        raise ValueError(f"{name} must be [low, high] with 0 <= low <= 1 <= high; got {list(pair)}")
    return float(pair[0]), float(pair[1])


def check_correction(*, icepop=None, mis=None, tr_max_kl=None) -> None:
    """``ValueError`` naming the parameter when a correction's setting cannot be right."""
    _bounds("icepop", icepop)
    _bounds("mis", mis)
    if tr_max_kl is not None and not float(tr_max_kl) > 0.0:
        raise ValueError(f"tr_max_kl must be > 0 (a KL bound); got {tr_max_kl}")


def mismatch_correction(
    old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *,
    tis_cap: Optional[float] = None, tis_mode: str = "truncate", tis_level: str = "token",
    icepop: Optional[Sequence[float]] = None, mis: Optional[Sequence[float]] = None,
    tr_max_kl: Optional[float] = None, lengths: Optional[Tensor] = None, ops: SeqOps = LOCAL,
) -> Optional[Correction]:
    """The product of the configured corrections (module doc), or None when none is."""
    if tis_cap is None and icepop is None and mis is None and tr_max_kl is None:
        return None
    icepop, mis = _bounds("icepop", icepop), _bounds("mis", mis)
    check_correction(tr_max_kl=tr_max_kl)
    on = as_float_mask(mask, old_logprobs) > 0
    with torch.no_grad():
        log_rho = ((old_logprobs - rollout_logprobs) * on).clamp(-MAX_LOG_RHO, MAX_LOG_RHO)
        w = torch.ones_like(old_logprobs)
        flags: Dict[str, Tensor] = {}
        if tis_cap is not None:
            tis = truncated_is(old_logprobs, rollout_logprobs, mask, cap=tis_cap, mode=tis_mode,
                               level=tis_level, lengths=lengths, ops=ops)
            w, flags["tis_capped"] = w * tis.w, tis.capped
        if icepop is not None:
            rho = log_rho.exp()
            keep = (rho >= icepop[0]) & (rho <= icepop[1])
            w, flags["icepop_masked"] = w * keep, on & ~keep
        if mis is not None:
            seq = log_ratio("sequence", log_rho, torch.zeros_like(log_rho), mask, lengths, ops)
            g = seq.exp()
            keep = (g >= mis[0]) & (g <= mis[1])
            w, flags["mis_masked"] = w * keep, on & ~keep
        if tr_max_kl is not None:
            worst = ops.seq_max(token_kl(log_rho), mask)              # [B]
            keep = (worst <= tr_max_kl)[:, None].expand_as(w)
            w, flags["tr_masked"] = w * keep, on & ~keep
    return Correction(w * on, flags)


def token_kl(log_rho: Tensor) -> Tensor:
    """k3 of ``pi_roll`` against ``pi_old`` per token from ``log rho = lp_old - lp_roll``:
    ``rho - 1 - log rho`` (>= 0; its mean over the engine's samples estimates KL(pi_roll||pi_old))."""
    return torch.expm1(log_rho) - log_rho


def mismatch_gap(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> Dict[str, Tensor]:
    """Per-token gap between the engine and the trainer on action tokens (0 elsewhere): ``k1`` =
    ``lp_roll - lp_old`` and ``k3`` (``token_kl``), each an estimate of KL(pi_roll || pi_old)
    from the engine's samples; ``abs`` = ``|lp_old - lp_roll|``."""
    m = as_float_mask(mask, old_logprobs)
    with torch.no_grad():
        d = (old_logprobs - rollout_logprobs) * m
        return {"k1": -d, "k3": token_kl(d.clamp(-MAX_LOG_RHO, MAX_LOG_RHO)) * m, "abs": d.abs()}
