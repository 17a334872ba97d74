"""Advantage estimators: a registry of functions ``-> advantages[B,T]`` (zero off the mask).

Legend: ``B`` responses, ``T`` padded response positions, ``rewards[B]`` scalar outcome rewards,
``mask[B,T]`` action tokens, ``group_ids[B]`` prompt index in ``[0, B)`` (G responses share one),
``kl[B,T]`` a per-token KL sample (already stop-gradient), ``values[B,T]`` critic values,
``ops`` the sequence reductions (``LOCAL``, or ``CPSeqOps`` for context-parallel shards).
Advantages are constants of the policy loss: every estimator runs under ``no_grad``.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_rl.algo.masked import LOCAL, SeqOps, as_float_mask, group_mean_std, masked_whiten
from megatron_rl.algo.registry import Registry, check_params, keyword_params

Tensor = torch.Tensor

ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
DATA_ARGS = ("rewards", "mask", "group_ids", "kl", "values", "ops")


def compute_advantages(
    name: str,
    *,
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    kl: Optional[Tensor] = None,
    values: Optional[Tensor] = None,
    ops: SeqOps = LOCAL,
    **params,
) -> Tensor:
    """Advantages ``[B,T]`` of the registered estimator ``name`` (see ``ADVANTAGE_ESTIMATORS``).

    ``params`` are the estimator's keyword parameters; an unknown one raises ``TypeError`` naming
    it and listing the accepted ones.
    """
    fn = ADVANTAGE_ESTIMATORS.get_fn(name)
    check_params("advantage estimator", name, params, estimator_params(name))
    with torch.no_grad():
        return fn(rewards=rewards, mask=mask, group_ids=group_ids, kl=kl, values=values, ops=ops,
                  **params)


def estimator_params(name: str) -> dict:
    """The tunable parameters of an estimator with their defaults."""
    return keyword_params(ADVANTAGE_ESTIMATORS.get_fn(name), skip=DATA_ARGS)


def last_token(mask: Tensor, ops: SeqOps = LOCAL) -> Tensor:
    """``[B,T]`` bool: the last action token of each sequence (none for an empty sequence)."""
    m = mask.to(torch.float32)
    after = ops.suffix_sum(m, m) - m  # action tokens strictly after j
    return (m > 0) & (after == 0)


def _normalise_in_group(x, valid, group_ids, *, norm_by_std, eps, unbiased_std, std_min=None,
                        std_max=None, ops: SeqOps = LOCAL):
    if x.dim() == 2:  # per position: position j of every response in the group, across shards
        mean, std, n = ops.position_group_stats(x, valid, group_ids, unbiased=unbiased_std)
    else:  # per response: every rank holds all B rewards, nothing to communicate
        mean, std, n = group_mean_std(x, valid, group_ids, unbiased=unbiased_std)
    adv = x - mean
    if norm_by_std:
        if std_min is not None or std_max is not None:
            std = std.clamp(min=std_min, max=std_max)
        adv = adv / (std + eps)
    # a lone response (or position) has no baseline to compare with: no learning signal
    return torch.where(n > 1, adv, torch.zeros_like(adv))


def _maybe_whiten(adv: Tensor, mask: Tensor, whiten: bool, ops: SeqOps) -> Tensor:
    return masked_whiten(adv, mask, ops=ops) if whiten else adv


def _require(tensor, what: str, name: str):
    if tensor is None:
        raise ValueError(f"advantage estimator {name!r} needs {what}")
    return tensor


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo(
    *, rewards, mask, group_ids, kl=None, values=None, ops=LOCAL,
    norm_by_std: bool = True, eps: float = 1e-6, unbiased_std: bool = True,
    std_min: Optional[float] = None, std_max: Optional[float] = None, whiten: bool = False,
) -> Tensor:
    """GRPO: ``A_g = (R_g - mean(R)) / (std(R) + eps)`` over the group, on every action token.

    ``std_min/std_max`` clip the std before dividing (a near-constant group otherwise gets huge
    advantages); ``norm_by_std=False`` is Dr.GRPO. A group of one gets advantage 0. ``whiten``
    then normalises over the whole batch (the trainer: the step, every rank; ``step_whitening``).
    """
    ones = torch.ones_like(rewards)
    adv = _normalise_in_group(rewards, ones, group_ids, norm_by_std=norm_by_std, eps=eps,
                              unbiased_std=unbiased_std, std_min=std_min, std_max=std_max)
    return _maybe_whiten(adv[:, None] * as_float_mask(mask, adv), mask, whiten, ops)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo(*, rewards, mask, group_ids, kl=None, values=None, ops=LOCAL,
            whiten: bool = False) -> Tensor:
    """Dr.GRPO: ``A_g = R_g - mean(R)`` (no std normalisation, which biases towards easy/hard
    prompts); pair it with the ``seq-mean-token-sum`` aggregation and a constant normaliser."""
    return grpo(rewards=rewards, mask=mask, group_ids=group_ids, ops=ops, norm_by_std=False,
                whiten=whiten)


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo(*, rewards, mask, group_ids, kl=None, values=None, ops=LOCAL,
         whiten: bool = False) -> Tensor:
    """RLOO: ``A_g = R_g - mean of the other G-1 rewards = G/(G-1) * (R_g - mean(R))``."""
    mean, _, n = group_mean_std(rewards, torch.ones_like(rewards), group_ids)
    adv = torch.where(n > 1, (rewards - mean) * n / (n - 1).clamp_min(1), torch.zeros_like(rewards))
    return _maybe_whiten(adv[:, None] * as_float_mask(mask, adv), mask, whiten, ops)


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float, ops: SeqOps = LOCAL) -> Tensor:
    """``G_j = sum_{k >= j, action} gamma^(#actions between) r_k``; environment tokens are skipped
    (they neither earn reward nor count as a step)."""
    m = as_float_mask(mask, token_rewards)
    if gamma == 1.0:
        return ops.suffix_sum(token_rewards, mask) * m
    # an action token discounts what follows; any other token passes it through unchanged
    a = m * gamma + (1 - m)
    return ops.linear_suffix_scan(a, token_rewards * m) * m


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
def reinforce_pp(
    *, rewards, mask, group_ids, kl=None, values=None, ops=LOCAL,
    kl_coef: float = 0.0, gamma: float = 1.0, baseline: str = "none", whiten: bool = True,
) -> Tensor:
    """REINFORCE++: per-token reward ``-kl_coef * kl`` plus ``R`` at the last action token,
    discounted returns, whitened over the whole batch (the trainer: the step's, every rank).
    ``baseline="group"`` first subtracts the group mean of ``R`` (REINFORCE++-baseline)."""
    if baseline not in ("none", "group"):
        raise ValueError(f"reinforce_pp baseline must be 'none' or 'group', got {baseline!r}")
    r = rewards
    if baseline == "group":
        mean, _, _ = group_mean_std(rewards, torch.ones_like(rewards), group_ids)
        r = rewards - mean
    m = as_float_mask(mask, r)
    token_r = last_token(mask, ops).to(r.dtype) * r[:, None]
    if kl_coef != 0.0:
        token_r = token_r - kl_coef * _require(kl, "kl (kl_coef != 0)", "reinforce_pp") * m
    return _maybe_whiten(discounted_returns(token_r, mask, gamma, ops), mask, whiten, ops)


@ADVANTAGE_ESTIMATORS.register("gae")
def gae(
    *, rewards, mask, group_ids, kl=None, values=None, ops=LOCAL,
    gamma: float = 1.0, lam: float = 1.0, kl_coef: float = 0.0, whiten: bool = True,
) -> Tensor:
    """GAE(gamma, lambda) with per-token reward ``-kl_coef * kl`` plus ``R`` at the last action
    token; the bootstrap after the last token is 0. Environment tokens are skipped: the next
    state of an action token is the next action token. Under CP the three scans exchange only
    per-chunk carries (``CPSeqOps.linear_suffix_scan``)."""
    v = _require(values, "values", "gae")
    m = as_float_mask(mask, v)
    r = last_token(mask, ops).to(v.dtype) * rewards[:, None]
    if kl_coef != 0.0:
        r = r - kl_coef * _require(kl, "kl (kl_coef != 0)", "gae") * m
    # the next state's value: that of the next action token (0 after the last), skipping
    # environment tokens; then the advantage recursion over action tokens
    next_v = ops.linear_suffix_scan(1 - m, v * m, exclusive=True)
    delta = (r + gamma * next_v - v) * m
    adv = ops.linear_suffix_scan(m * (gamma * lam) + (1 - m), delta) * m
    return masked_whiten(adv, mask, ops=ops) if whiten else adv


def future_kl_returns(
    rewards: Tensor, kl: Tensor, mask: Tensor, beta: float, lengths: Optional[Tensor] = None,
    ops: SeqOps = LOCAL,
) -> Tensor:
    """``r_j = R - beta / H * sum_{k >= j} K_k`` on action tokens (0 elsewhere).

    ``H`` is the response's own action count (``lengths[B]`` overrides it, e.g. the global length
    of a CP-sharded sequence). ``K`` should be stop-gradient ``lp - lp_ref`` (k1)."""
    if lengths is None:
        lengths = ops.seq_len(mask, kl.dtype)
    per_token = kl / lengths.to(kl.dtype).clamp_min(1)[:, None]
    r = rewards[:, None].to(kl.dtype) - beta * ops.suffix_sum(per_token, mask)
    return r * as_float_mask(mask, r)


# future_kl_grpo's floor on the per-position std, in reward units: below the std of any group whose
# rewards differ (0/1 rewards: 0.35 at G=8, 0.1 at G=100 with one success), far above the
# spread of beta-weighted KL sums (~1e-3), so a group whose rewards agree keeps small advantages
FUTURE_KL_STD_MIN = 0.1

# estimators with per-position group statistics: under CP their packed batches are group-aligned
PER_POSITION_ESTIMATORS = frozenset({"future_kl_grpo"})


@ADVANTAGE_ESTIMATORS.register("future_kl_grpo")
def future_kl_grpo(
    *, rewards, mask, group_ids, kl=None, values=None, ops=LOCAL,
    beta: float = 0.05, norm_by_std: bool = True, eps: float = 1e-6, unbiased_std: bool = True,
    std_min: float = FUTURE_KL_STD_MIN, std_max: Optional[float] = None, whiten: bool = False,
) -> Tensor:
    """Token-level KL-regularised GRPO: future-KL returns ``r_j`` normalised per position ``j``
    across the responses of the group that have an action token at ``j``.

    A position with a single valid response gets advantage 0. ``std_min/std_max`` clip the
    per-position std, as in ``grpo``. ``std_min`` defaults to ``FUTURE_KL_STD_MIN`` (in reward
    units; 0 turns the floor off): where a group's rewards agree, the spread of ``r_j`` is only the KL sums' (~1e-3 at
    ``beta`` 0.05), and dividing by it would turn KL noise into advantages near +-1. The KL lives
    in the advantage only: adding a KL term to the loss as well would count it twice.
    """
    r = future_kl_returns(rewards, _require(kl, "kl", "future_kl_grpo"), mask, beta, ops=ops)
    adv = _normalise_in_group(r, mask, group_ids, norm_by_std=norm_by_std, eps=eps,
                              unbiased_std=unbiased_std, std_min=std_min, std_max=std_max, ops=ops)
    return _maybe_whiten(adv * as_float_mask(mask, adv), mask, whiten, ops)


# the parameter that weights the KL an estimator puts in the reward
REWARD_KL_KEYS = {"future_kl_grpo": "beta", "reinforce_pp": "kl_coef", "gae": "kl_coef"}


def reward_kl_coef(name: str, params: dict) -> float:
    """The weight of the KL estimator ``name`` puts in the reward (0: none)."""
    key = REWARD_KL_KEYS.get(name)
    return 0.0 if key is None else float(params.get(key, estimator_params(name)[key]))


def step_whitening(name: str, params: dict):
    """``(params, whiten)``: the estimator's parameters with its own batch whitening switched off
    (every estimator with a ``whiten`` parameter), and whether the whitening it asked for (its
    default unless set) is to be done over the whole step instead (``parallel.loss.step_whiten``)."""
    default = estimator_params(name).get("whiten")
    if default is None:
        return dict(params), False
    return {**params, "whiten": False}, bool(params.get("whiten", default))
