"""Policy losses: a registry of presets over one REINFORCE-form core, and the aggregations.

Per action token the loss is ``-sg(w) * A * lp`` (written ``-w * A * exp(lp - sg(lp))`` so that
its value is ``-w * A``, the familiar surrogate, and its gradient ``-w * A * grad lp``), plus the
optional KL, KL-Cov and entropy terms; ``w`` = weight function of the IS ratio, times the
truncated-IS correction, with Clip-Cov's selection zeroed. The KL goes outside the weight
(``kl_placement="loss"``: ``+ kl_coef * kl``) or into ``A`` inside it (``"surrogate"``: ``A -
kl_coef * c``, ``kl_surrogate_penalty``), which keeps its gradient right off-policy.

Aggregations, with GLOBAL denominators (all ranks and micro-batches of the optimizer step, computed
once before the first micro-batch and passed in as ``num_tokens`` / ``num_seqs``):
  token-mean           sum_{i,t} l_it / num_tokens
  seq-mean-token-mean  sum_i (sum_t l_it / H_i) / num_seqs                       (classic GRPO, GSPO)
  seq-mean-token-sum   sum_i (sum_t l_it) / (num_seqs * norm_constant)           (Dr.GRPO, Dr.GSPO)
Summing a micro-batch's loss over micro-batches and ranks gives the step's loss. Metrics are
tensors with the same denominators, so they sum the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Optional, Tuple

import torch

import megatron_rl.algo.entropy_control as entropy_control
from megatron_rl.algo.kl import kl_estimate
from megatron_rl.algo.masked import LOCAL, SeqOps, as_float_mask
from megatron_rl.algo.mismatch import check_correction, mismatch_correction
from megatron_rl.algo.ratios import log_ratio
from megatron_rl.algo.registry import Registry, check_params, keyword_params
from megatron_rl.algo.weights import WEIGHT_FUNCTIONS

Tensor = torch.Tensor

POLICY_LOSSES = Registry("policy loss")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: a stale token must not overflow the ratio to inf


@dataclass
class LossInputs:
    """One micro-batch. ``[B,T]`` tensors; ``num_tokens``/``num_seqs`` global step counts (tensor
    or float); ``seq_lengths[B]`` the action count of each sequence, if already known (otherwise
    ``ops`` counts it); ``generator`` seeds Clip-Cov's random selection; ``ops`` the reductions
    along sequences (``CPSeqOps`` when the sequences are sharded over context-parallel ranks)."""

    logprobs: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    mask: Tensor
    num_tokens: object
    num_seqs: object
    ref_logprobs: Optional[Tensor] = None
    rollout_logprobs: Optional[Tensor] = None
    entropy: Optional[Tensor] = None
    seq_lengths: Optional[Tensor] = None
    generator: Optional[torch.Generator] = None
    ops: SeqOps = LOCAL


@dataclass
class Extras:
    """Parameters every loss accepts: aggregation constant, entropy bonus, the corrections of the
    mismatch against the rollout engine's log-probs (``algo.mismatch``: TIS, IcePop, MIS,
    trust-region masking), entropy control (none | clip_cov | kl_cov), and the clamps of the
    loss-side KL (``kl.kl_estimate``; verl's k3: 20 and 10; default none)."""

    norm_constant: float = 1.0
    entropy_coef: float = 0.0
    tis_cap: Optional[float] = None
    tis_mode: str = "truncate"
    tis_level: str = "token"
    icepop: Optional[Tuple[float, float]] = None
    mis: Optional[Tuple[float, float]] = None
    tr_max_kl: Optional[float] = None
    entropy_control: str = "none"
    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-3
    kl_cov_coef: float = 1.0
    kl_clamp_log_ratio: Optional[float] = None
    kl_clamp_value: Optional[float] = None

    def __post_init__(self):
        for name, allowed in (("tis_mode", ("truncate", "mask")), ("tis_level", ("token", "sequence")),
                              ("entropy_control", ("none", "clip_cov", "kl_cov"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        check_correction(icepop=self.icepop, mis=self.mis, tr_max_kl=self.tr_max_kl)

    def correction(self) -> dict:
        """The keyword arguments of ``mismatch.mismatch_correction``."""
        return dict(tis_cap=self.tis_cap, tis_mode=self.tis_mode, tis_level=self.tis_level,
                    icepop=self.icepop, mis=self.mis, tr_max_kl=self.tr_max_kl)


EXTRA_PARAMS = {f.name: f.default for f in fields(Extras)}


def aggregate(per_token: Tensor, x: LossInputs, agg: str, norm_constant: float = 1.0) -> Tensor:
    """Reduce ``per_token[B,T]`` to this micro-batch's share of the step loss (see module doc)."""
    return aggregate_tokens(per_token, x.mask, agg, x.num_tokens, x.num_seqs, norm_constant,
                            x.seq_lengths, x.ops)


def aggregate_tokens(per_token: Tensor, mask: Tensor, agg: str, num_tokens, num_seqs,
                     norm_constant: float = 1.0, seq_lengths: Optional[Tensor] = None,
                     ops: SeqOps = LOCAL) -> Tensor:
    """``aggregate`` from its parts (the critic's value loss uses it too)."""
    m = as_float_mask(mask, per_token)
    if agg == "token-mean":
        return (per_token * m).sum() / num_tokens
    if agg == "seq-mean-token-mean":
        lengths = seq_lengths if seq_lengths is not None else ops.seq_len(mask, per_token.dtype)
        per_seq = (per_token * m).sum(-1) / lengths.to(per_token.dtype).clamp_min(1)
        return per_seq.sum() / num_seqs
    if agg == "seq-mean-token-sum":
        return (per_token * m).sum() / (num_seqs * norm_constant)
    raise ValueError(f"unknown loss aggregation {agg!r}; known: {', '.join(AGGREGATIONS)}")


def policy_loss(name: str, **kwargs) -> Tuple[Tensor, Dict[str, Tensor]]:
    """``policy_loss(name, *, logprobs, old_logprobs, advantages, mask, num_tokens, num_seqs,
    ref_logprobs=None, rollout_logprobs=None, entropy=None, seq_lengths=None, generator=None,
    ops=LOCAL, **params)`` -> ``(loss, metrics)``. ``params``: the preset's own (see ``loss_params(name)``)."""
    fn = POLICY_LOSSES.get_fn(name)
    data = {f.name: kwargs.pop(f.name) for f in fields(LossInputs) if f.name in kwargs}
    x = LossInputs(**data)
    check_params("policy loss", name, kwargs, loss_params(name))
    extras = Extras(**{k: kwargs.pop(k) for k in list(kwargs) if k in EXTRA_PARAMS})
    return fn(x, extras, **kwargs)


def loss_params(name: str) -> dict:
    """All parameters a preset accepts, with defaults: its own plus ``Extras``."""
    return {**keyword_params(POLICY_LOSSES.get_fn(name)), **EXTRA_PARAMS}


KL_PLACEMENTS = ("loss", "surrogate")


def kl_surrogate_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str,
                         clamp_log_ratio: Optional[float] = None,
                         clamp_value: Optional[float] = None) -> Tensor:
    """The per-token penalty ``c`` that ``kl_placement: surrogate`` subtracts from the advantage
    (``A - kl_coef * c``, inside the importance weight; detached). ``c`` is the derivative in
    ``lp`` of the loss-side estimator, so at ``rho = 1`` the gradient equals the loss placement's:
      k2   c = lp - lp_ref = log(pi/pi_ref)      (the k2 loss's gradient; "k1 in the reward": k1
           names the same penalty)
      k3   c = 1 - pi_ref/pi                    (the k3 loss's gradient)
    Off-policy, the weight ``rho`` then multiplies the KL gradient as it does the reward's; with
    k2 that is the gradient of ``KL(pi || pi_ref)`` from samples of the old policy, while the loss
    placement leaves it unweighted. (k3's ``c`` has expectation ``-E_ref[grad log pi]`` under
    ``pi``: the gradient of the forward ``KL(pi_ref || pi)``, not of ``KL(pi || pi_ref)``.)
    ``clamp_log_ratio`` bounds ``log r``, ``clamp_value`` ``c``."""
    if kind not in ("k1", "k2", "k3"):
        raise ValueError(f"kl_kind={kind!r} with kl_placement=surrogate: use k2 (the k2 loss's "
                         "gradient, log pi/pi_ref; k1 names the same) or k3 (1 - pi_ref/pi)")
    log_r = (ref_logprobs - logprobs).detach()
    if clamp_log_ratio is not None:
        log_r = log_r.clamp(-clamp_log_ratio, clamp_log_ratio)
    c = -torch.expm1(log_r) if kind == "k3" else -log_r
    return c if clamp_value is None else c.clamp(-clamp_value, clamp_value)


def reinforce_form(
    x: LossInputs, e: Extras, *, ratio: str, weight: str, weight_params: dict, agg: str,
    kl_coef: float = 0.0, kl_kind: str = "k2", kl_placement: str = "loss",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The core every preset calls; returns ``(loss, metrics)``."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {agg!r}; known: {', '.join(AGGREGATIONS)}")
    if kl_placement not in KL_PLACEMENTS:
        raise ValueError(f"kl_placement must be one of {', '.join(KL_PLACEMENTS)}; got {kl_placement!r}")
    m = as_float_mask(x.mask, x.logprobs)
    lp, adv = x.logprobs, x.advantages.detach()
    if x.seq_lengths is None:  # reduce once; the ratio and the aggregation both divide by it
        x.seq_lengths = x.ops.seq_len(x.mask, lp.dtype)
    kl = None
    if x.ref_logprobs is not None:
        kl = kl_estimate(lp, x.ref_logprobs, kl_kind if kl_placement == "loss" else "k3",
                         clamp_log_ratio=e.kl_clamp_log_ratio, clamp_value=e.kl_clamp_value)
        if kl_coef != 0.0 and kl_placement == "surrogate":
            adv = adv - kl_coef * kl_surrogate_penalty(lp, x.ref_logprobs, kl_kind,
                                                       e.kl_clamp_log_ratio, e.kl_clamp_value)
    log_rho = log_ratio(ratio, lp, x.old_logprobs, x.mask, x.seq_lengths, x.ops).detach()
    rho = log_rho.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()
    wfn = WEIGHT_FUNCTIONS.get_fn(weight)
    check_params("weight function", weight, weight_params, keyword_params(wfn))
    W = wfn(rho, adv, **weight_params)
    w, value = W.w, (W.w if W.surrogate is None else W.surrogate)
    metrics = {"clip_frac_low": W.clipped_low, "clip_frac_high": W.clipped_high, "ratio_mean": rho,
               # how far the update has moved from the rollout's old policy: KL(old || new), k3
               "approx_kl": kl_estimate(x.old_logprobs, lp.detach(), "k3")}
    if x.rollout_logprobs is not None:
        metrics["rollout_mismatch_k3"] = kl_estimate(x.rollout_logprobs, x.old_logprobs, "k3").detach()
        fix = mismatch_correction(x.old_logprobs, x.rollout_logprobs, x.mask, lengths=x.seq_lengths,
                                  ops=x.ops, **e.correction())
        if fix is not None:
            w, value = w * fix.w, value * fix.w
            metrics.update({f"{k}_frac": v for k, v in fix.flags.items()})
    penalty, keep = _entropy_control(x, e, adv, W, metrics)
    if keep is not None:
        w, value = w * keep, value * keep
    per_token = penalty - w * adv * torch.exp(lp - lp.detach())
    metrics["pg_loss"] = aggregate(per_token.detach(), x, agg, e.norm_constant)
    # what verl / TRL log as pg_loss: the clipped surrogate's value, not 0 on clipped tokens
    metrics["pg_loss_clipped_surrogate"] = aggregate((penalty - value * adv).detach(), x, agg,
                                                     e.norm_constant)
    if kl is not None:
        metrics["kl"] = kl.detach()
        if kl_coef != 0.0 and kl_placement == "loss":
            per_token = per_token + kl_coef * kl
    if x.entropy is not None:
        metrics["entropy"] = x.entropy.detach()
        if e.entropy_coef != 0.0:
            per_token = per_token - e.entropy_coef * x.entropy
    loss = aggregate(per_token, x, agg, e.norm_constant)
    return loss, _finish_metrics(metrics, m, x.num_tokens)


def _entropy_control(x: LossInputs, e: Extras, adv: Tensor, W, metrics: dict):
    """Clip-Cov (a 0/1 ``keep`` multiplier of the weight) or KL-Cov (a per-token penalty);
    returns ``(penalty, keep)``, ``keep`` None when nothing is detached."""
    penalty = torch.zeros_like(x.logprobs)
    if e.entropy_control == "none":
        return penalty, None
    if x.ops.sharded:
        # both select tokens by a covariance ranked over the whole micro-batch; on shards that
        # would need every token's score on every rank, which this module exists to avoid
        raise ValueError(f"entropy_control={e.entropy_control!r} needs whole sequences; it is not "
                         "supported with context parallelism (set entropy_control: none or "
                         "context_parallel_size 1)")
    cov = entropy_control.centred_covariance(adv, x.logprobs, x.mask)
    keep = None
    if e.entropy_control == "clip_cov":
        sel = entropy_control.clip_cov_select(cov, x.mask, ratio=e.clip_cov_ratio,
                                              lb=e.clip_cov_lb, ub=e.clip_cov_ub, generator=x.generator,
                                              exclude=W.clipped_low | W.clipped_high)
        keep = (~sel).to(x.logprobs.dtype)
    else:  # kl_cov (Extras validated the choice)
        sel = entropy_control.kl_cov_select(cov, x.mask, ratio=e.kl_cov_ratio)
        penalty = torch.where(sel, e.kl_cov_coef * (x.logprobs - x.old_logprobs).abs(), penalty)
    metrics["cov_selected_frac"] = sel
    return penalty, keep


def _finish_metrics(metrics: dict, m: Tensor, num_tokens) -> Dict[str, Tensor]:
    out = {}
    for k, v in metrics.items():
        out[k] = v if v.dim() == 0 else (v.to(m.dtype) * m).sum() / num_tokens
    return out


@POLICY_LOSSES.register("grpo")
def grpo(x, e, *, eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: Optional[float] = None,
         kl_coef: float = 0.0, kl_kind: str = "k2", kl_placement: str = "loss",
         agg: str = "token-mean"):
    """Token ratios, PPO clip (``eps_high > eps_low`` = clip-higher, optional dual clip), optional
    KL: ``kl_placement=loss`` adds ``kl_coef * kl`` outside the weight (``kl_kind`` k2, the
    default, whose gradient is KL(pi||pi_ref)'s on-policy, or k3), ``surrogate`` puts it in the
    advantage inside the weight (k2 or k3; see ``kl_surrogate_penalty``), which stays correct
    off-policy."""
    return reinforce_form(x, e, ratio="token", weight="ppo_clip", agg=agg, kl_coef=kl_coef,
                          kl_kind=kl_kind, kl_placement=kl_placement,
                          weight_params=dict(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip))


@POLICY_LOSSES.register("gspo")
def gspo(x, e, *, eps_low: float = 3e-4, eps_high: float = 4e-4, kl_coef: float = 0.0,
         kl_kind: str = "k2", kl_placement: str = "loss", agg: str = "seq-mean-token-mean"):
    """GSPO-token: the sequence ratio ``s_i`` (geometric mean) on every token, clipped at the
    sequence level. ``agg="seq-mean-token-sum"`` with ``norm_constant`` is Dr.GSPO (objective
    times H)."""
    return reinforce_form(x, e, ratio="sequence", weight="ppo_clip", agg=agg, kl_coef=kl_coef,
                          kl_kind=kl_kind, kl_placement=kl_placement,
                          weight_params=dict(eps_low=eps_low, eps_high=eps_high))


@POLICY_LOSSES.register("future_kl_grpo")
def future_kl_grpo(x, e, *, ratio: str = "future", weight: str = "ppo_clip",
                   weight_params: Optional[dict] = None, agg: str = "token-mean"):
    """Token-level KL-regularised GRPO: the KL is already in the advantages (``future_kl_grpo``
    estimator), so there is no KL term here. ``ratio``: future (default: the future-only
    geometric mean ``exp(mean_{k>=j} d_k)``, the method's own ratio, which weighs token ``j`` by
    how the rest of the response moved, as its advantage sums the rest's KL), token or sequence."""
    return reinforce_form(x, e, ratio=ratio, weight=weight, weight_params=dict(weight_params or {}),
                          agg=agg)


@POLICY_LOSSES.register("reinforce")
def reinforce(x, e, *, ratio: str = "token", weight: str = "none",
              weight_params: Optional[dict] = None, agg: str = "token-mean",
              kl_coef: float = 0.0, kl_kind: str = "k2", kl_placement: str = "loss"):
    """Generic REINFORCE form: any ratio kind, any weight function, optional KL (placed as in
    ``grpo``)."""
    return reinforce_form(x, e, ratio=ratio, weight=weight, weight_params=dict(weight_params or {}),
                          agg=agg, kl_coef=kl_coef, kl_kind=kl_kind, kl_placement=kl_placement)
