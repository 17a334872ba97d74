"""Sample estimators of KL(pi || ref) from tokens drawn from pi, elementwise on ``[B,T]``.

With ``log r = ref_logprobs - logprobs``:
  k1 = -log r                 unbiased, high variance; its natural home is the reward
  k2 = (log r)^2 / 2          biased in value; as a loss its gradient is ``log(pi/ref) grad lp``,
                              whose expectation under pi is exactly grad KL(pi || ref) (the same as
                              k1 in the reward): the loss-side default
  k3 = r - 1 - log r          unbiased and >= 0 in value; as a loss its gradient is
                              ``(1 - ref/pi) grad lp``, whose expectation under pi is
                              ``-E_ref[grad log pi]`` = grad KL(ref || pi), the *forward* KL's
(Schulman's "Approximating KL divergence"; "Rethinking KL regularisation in RLHF").

Where each belongs (``algo.config`` refuses the rest unless ``algo.allow_unsound_kl``): the
reward side (the future-KL advantage, REINFORCE++'s per-token reward) takes k1, whose expectation
is the KL; a loss takes k2 (the reverse KL's gradient) or k3 (a different regulariser with the
same minimum); k1 as a loss has gradient ``grad lp``, which pushes every sampled token down.
Off-policy (``rho != 1``) a loss-side KL belongs inside the importance-weighted surrogate
(``kl_placement: surrogate`` in ``losses``): outside it, samples of the old policy estimate the
gradient under the wrong distribution.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_rl.algo.registry import Registry

Tensor = torch.Tensor

KL_ESTIMATORS = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def k1(log_r: Tensor) -> Tensor:
    """``-log r``."""
    return -log_r


@KL_ESTIMATORS.register("k2")
def k2(log_r: Tensor) -> Tensor:
    """``(log r)^2 / 2``."""
    return 0.5 * log_r.square()


@KL_ESTIMATORS.register("k3")
def k3(log_r: Tensor) -> Tensor:
    # expm1 keeps r - 1 exact when log r is tiny (the common, near-on-policy case)
    """``r - 1 - log r``."""
    return torch.expm1(log_r) - log_r


def kl_estimate(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    kind: str = "k3",
    *,
    mask: Optional[Tensor] = None,
    clamp_log_ratio: Optional[float] = None,
    clamp_value: Optional[float] = None,
) -> Tensor:
    """Elementwise KL estimate ``[B,T]`` of ``kind`` in {k1, k2, k3}; gradients flow to both inputs.

    Two optional clamps, off by default: ``clamp_log_ratio`` bounds ``log r`` to ``[-c, c]``
    before the estimator, ``clamp_value`` bounds the estimate itself (a clamped position passes
    no gradient). verl's ``low_var_kl`` (its k3) uses both, 20 and 10; slime and OpenRLHF clamp
    the value only (10). Without them one rare token (``log r`` of 30) makes k3 ``e^30``.
    ``mask`` zeros padded and environment positions.
    """
    fn = KL_ESTIMATORS.get_fn(kind)
    log_r = ref_logprobs - logprobs
    if clamp_log_ratio is not None:
        log_r = log_r.clamp(-clamp_log_ratio, clamp_log_ratio)
    out = fn(log_r)
    if clamp_value is not None:
        out = out.clamp(-clamp_value, clamp_value)
    if mask is not None:
        out = out * mask.to(out.dtype)
    return out
