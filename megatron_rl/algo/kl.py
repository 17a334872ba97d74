"""Sample estimators of KL(pi || ref) from tokens drawn from pi, elementwise on ``[B,T]``.

With ``log r = ref_logprobs - logprobs``:
  k1 = -log r                 unbiased, high variance; its natural home is the reward
  k2 = (log r)^2 / 2          biased; its gradient equals that of k1-in-reward, so it belongs in a loss
  k3 = r - 1 - log r          unbiased and >= 0 in value; in a loss its gradient is biased off-policy
(Schulman's "Approximating KL divergence"; "Rethinking KL regularisation in RLHF".)
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_rl.algo.registry import Registry

Tensor = torch.Tensor

KL_ESTIMATORS = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def k1(log_r: Tensor) -> Tensor:
    return -log_r


@KL_ESTIMATORS.register("k2")
def k2(log_r: Tensor) -> Tensor:
    return 0.5 * log_r.square()


@KL_ESTIMATORS.register("k3")
def k3(log_r: Tensor) -> Tensor:
    # expm1 keeps r - 1 exact when log r is tiny (the common, near-on-policy case)
    return torch.expm1(log_r) - log_r


def kl_estimate(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    kind: str = "k3",
    *,
    mask: Optional[Tensor] = None,
    clamp: Optional[float] = None,
) -> Tensor:
    """Elementwise KL estimate ``[B,T]`` of ``kind`` in {k1, k2, k3}; gradients flow to both inputs.

    ``clamp`` bounds ``log r`` to ``[-clamp, clamp]`` before the estimator (verl's ``low_var_kl``
    uses 10 for k3, whose exp otherwise explodes on rare tokens). ``mask`` zeros padded and
    environment positions.
    """
    fn = KL_ESTIMATORS.get_fn(kind)
    log_r = ref_logprobs - logprobs
    if clamp is not None:
        log_r = log_r.clamp(-clamp, clamp)
    out = fn(log_r)
    if mask is not None:
        out = out * mask.to(out.dtype)
    return out
