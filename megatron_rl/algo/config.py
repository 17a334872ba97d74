"""The ``algo`` config section: which advantage estimator and policy loss, with their parameters.

Parameters are checked against the registered function's keyword signature at load time, so
``algo.loss.params.eps_hgh`` fails before anything runs, naming the key and the accepted ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from megatron_rl.algo.advantages import (ADVANTAGE_ESTIMATORS, REWARD_KL_KEYS, compute_advantages,
                                         estimator_params, reward_kl_coef)
from megatron_rl.algo.kl import KL_ESTIMATORS
from megatron_rl.algo.losses import POLICY_LOSSES, loss_params, policy_loss
from megatron_rl.algo.masked import LOCAL, SeqOps, ShardedProbe
from megatron_rl.algo.registry import check_params, keyword_params
from megatron_rl.algo.weights import WEIGHT_FUNCTIONS
from megatron_rl.fields import ConfigError, field_

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "future_kl_grpo")


@dataclass
class AdvantageConfig:
    """The advantage estimator: registry name and keyword parameters."""
    name: str = field_("grpo", help="grpo, dr_grpo, rloo, reinforce_pp, future_kl_grpo, gae "
                                    "(PPO with the critic): algo.advantages.ADVANTAGE_ESTIMATORS")
    params: Dict[str, Any] = field_(default_factory=dict, help="the estimator's keyword "
                                    "arguments (docs/api.md), e.g. {beta: 0.05}")


@dataclass
class LossConfig:
    """The policy loss: registry name and keyword parameters."""
    name: str = field_("gspo", help="the policy loss: algo.losses.POLICY_LOSSES (docs/api.md)")
    params: Dict[str, Any] = field_(default_factory=dict, help="the loss's keyword arguments, "
                                    "e.g. {eps_low: 3e-3, eps_high: 4e-3, agg: token_mean}")


@dataclass
class OverlongConfig:
    """DAPO soft overlong punishment added to the reward (``buffer_len`` 0 = off)."""

    buffer_len: int = field_(0, ge=0, help="the last tokens before max_response_len over which "
                                      "the penalty grows; 0: off")
    penalty_factor: float = field_(1.0, ge=0.0, help="the penalty at max_response_len")


@dataclass
class MismatchConfig:
    """The train/inference mismatch (``algo.mismatch``): whose log-probs are the behaviour policy,
    and the corrections of the gap between the engine's (``pi_roll``) and the trainer's old-policy
    log-probs (``pi_old``), ``rho = pi_old / pi_roll`` per token (``algo.mismatch`` module)."""

    behaviour: str = field_("old", choices=("old", "rollout"),
                            help="old: the trainer's old-policy pass; rollout: the engine's "
                                 "log-probs (no old pass; the loss ratio is pi/pi_roll)")
    tis_cap: Optional[float] = field_(None, gt=0.0, help="truncated IS: weight min(rho, cap)")
    tis_level: str = field_("token", choices=("token", "sequence"),
                            help="TIS on each token's rho or the sequence's geometric mean")
    icepop: Optional[List[float]] = field_(None, help="[low, high]: keep a token only if "
                                           "low <= rho <= high (IcePop), e.g. [0.5, 2.0]")
    mis: Optional[List[float]] = field_(None, help="[low, high]: keep a sequence only if its "
                                        "geometric-mean rho is within (MIS), e.g. [0.5, 2.0]")
    tr_max_kl: Optional[float] = field_(None, gt=0.0, help="trust-region masking: drop a sequence "
                                        "whose largest per-token KL(engine || trainer) exceeds it")

    def loss_params(self) -> Dict[str, Any]:
        """The corrections as the policy loss's keyword arguments (``losses.Extras``)."""
        out: Dict[str, Any] = {}
        if self.tis_cap is not None:
            out.update(tis_cap=self.tis_cap, tis_level=self.tis_level)
        for key in ("icepop", "mis", "tr_max_kl"):
            value = getattr(self, key)
            if value is not None:
                out[key] = tuple(value) if isinstance(value, (list, tuple)) else value
        return out


# the loss parameters of the corrections: set through algo.mismatch, the one place for them
CORRECTION_KEYS = ("tis_cap", "tis_mode", "tis_level", "icepop", "mis", "tr_max_kl")


@dataclass
class AlgoConfig:
    """The ``algo`` section: estimator, loss, KL, DAPO and the train/inference corrections."""
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    kl_estimator: str = field_("k1", choices=tuple(KL_ESTIMATORS),
                               help="per-token KL fed to the advantage (future_kl_grpo, reinforce_pp, gae)")
    kl_source: str = field_("old", choices=("old", "current"),
                            help="policy side of the advantage's KL: the rollout-time (old) "
                                 "policy, or the current one, recomputed before each update")
    kl_clamp_log_ratio: Optional[float] = field_(
        None, gt=0.0, help="bound |log(pi_ref/pi)| of the advantage's KL (verl's k3: 20)")
    kl_clamp_value: Optional[float] = field_(
        None, gt=0.0, help="bound the advantage's per-token KL value (verl's k3: 10)")
    allow_unsound_kl: bool = field_(False, help="run a KL placement the load-time checks refuse "
                                                "(the KL counted twice, k1 as a loss, k2/k3 as a reward)")
    dynamic_sampling: bool = field_(False, help="DAPO: drop groups whose rewards are all equal")
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    mismatch: MismatchConfig = field(default_factory=MismatchConfig)

    def loss_params(self) -> Dict[str, Any]:
        """The policy loss's keyword arguments: ``loss.params`` and the mismatch corrections."""
        return {**self.loss.params, **self.mismatch.loss_params()}

    def check(self, prefix: str = "algo", context_parallel: int = 1) -> None:
        """Names exist in their registries, every parameter is one the function accepts, and the
        combination runs (on sequences sharded over ``context_parallel`` ranks, if > 1)."""
        _lookup(ADVANTAGE_ESTIMATORS, self.advantage.name, f"{prefix}.advantage.name")
        _lookup(POLICY_LOSSES, self.loss.name, f"{prefix}.loss.name")
        if self.loss.name == "future_kl_grpo" and self.advantage.name != "future_kl_grpo":
            raise ConfigError(
                f"{prefix}.loss.name=future_kl_grpo expects {prefix}.advantage.name=future_kl_grpo "
                f"(the KL lives in those advantages); got {self.advantage.name!r}")
        _params("advantage estimator", self.advantage.name, self.advantage.params,
                estimator_params(self.advantage.name), f"{prefix}.advantage.params")
        _params("policy loss", self.loss.name, self.loss.params, loss_params(self.loss.name),
                f"{prefix}.loss.params")
        wname = self.loss.params.get("weight")
        if wname is not None:
            wfn = _lookup(WEIGHT_FUNCTIONS, wname, f"{prefix}.loss.params.weight")
            _params("weight function", wname, self.loss.params.get("weight_params") or {},
                    keyword_params(wfn), f"{prefix}.loss.params.weight_params")
        if not self.allow_unsound_kl:
            _check_kl_placement(self, prefix)
        _check_mismatch(self, prefix)
        _dry_run(self, prefix, LOCAL if context_parallel == 1 else ShardedProbe(context_parallel))


def _check_kl_placement(cfg: "AlgoConfig", prefix: str) -> None:
    """Refuse KL placements whose gradient is not the KL's (``algo.kl`` module doc)."""
    adv, loss = cfg.advantage, cfg.loss
    in_reward = reward_kl_coef(adv.name, adv.params)
    loss_coef = float(loss.params.get("kl_coef", 0.0) or 0.0)
    placement = loss.params.get("kl_placement", "loss")
    kind = loss.params.get("kl_kind", "k3")
    key = REWARD_KL_KEYS.get(adv.name)
    override = f"(set {prefix}.allow_unsound_kl=true to run it anyway)"
    if in_reward and loss_coef:
        raise ConfigError(
            f"{prefix}.advantage.params.{key}={in_reward:g} puts the KL in the reward and "
            f"{prefix}.loss.params.kl_coef={loss_coef:g} adds it to the loss: the KL would be "
            f"counted twice; set one of them to 0 {override}")
    if loss_coef and placement == "loss" and kind == "k1":
        raise ConfigError(
            f"{prefix}.loss.params.kl_kind=k1 as a loss term has gradient grad(lp), which pushes "
            "every sampled token down whatever the KL; use kl_kind k3 (or k2), or "
            f"kl_placement=surrogate with k1 {override}")
    if in_reward and cfg.kl_estimator in ("k2", "k3"):
        raise ConfigError(
            f"{prefix}.kl_estimator={cfg.kl_estimator} feeds {prefix}.advantage.name={adv.name} a "
            "non-negative per-token penalty whose expectation is not the KL; the reward side "
            f"takes k1 (set {prefix}.kl_estimator=k1) {override}")


def _check_mismatch(cfg: "AlgoConfig", prefix: str) -> None:
    """The corrections live in ``algo.mismatch`` only, and need the trainer's old pass."""
    moved = [k for k in CORRECTION_KEYS if k in cfg.loss.params]
    if moved:
        raise ConfigError(f"{prefix}.loss.params.{moved[0]}: the train/inference corrections are "
                          f"set under {prefix}.mismatch (tis_cap, tis_level, icepop, mis, "
                          "tr_max_kl); move it there")
    m = cfg.mismatch
    for key in ("icepop", "mis"):
        value = getattr(m, key)
        if value is not None and (len(value) != 2 or not 0.0 <= value[0] <= 1.0 <= value[1]):
            raise ConfigError(f"{prefix}.mismatch.{key}: must be [low, high] with 0 <= low <= 1 "
                              f"<= high; got {list(value)}")
    if m.behaviour == "rollout" and m.loss_params():
        raise ConfigError(f"{prefix}.mismatch.behaviour=rollout trains against the engine's "
                          "log-probs (the loss ratio pi/pi_roll corrects the gap itself); the "
                          f"corrections compare the trainer's old pass with the engine: set "
                          f"{prefix}.mismatch.behaviour=old to use "
                          f"{', '.join(sorted(m.loss_params()))}")


def _dry_run(cfg: "AlgoConfig", prefix: str, ops: SeqOps) -> None:
    """Run the configured estimator and loss once on a 2x2 batch, so that a bad parameter VALUE
    (``agg: sum``, ``entropy_control: clipcov``, ``dual_clip`` below the clip range) or a method
    that cannot run on context-parallel shards fails at load, with the function's own message,
    rather than at the first training step."""
    t = torch.zeros(2, 2)
    data = dict(rewards=torch.tensor([0.0, 1.0]), mask=torch.ones(2, 2), group_ids=torch.tensor([0, 0]),
                kl=t, values=t, ops=ops)
    try:
        compute_advantages(cfg.advantage.name, **data, **cfg.advantage.params)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{prefix}.advantage.params: {e}") from None
    try:
        policy_loss(cfg.loss.name, logprobs=t, old_logprobs=t, advantages=t, mask=torch.ones(2, 2),
                    ref_logprobs=t, rollout_logprobs=t, num_tokens=4.0, num_seqs=2.0, ops=ops,
                    **cfg.loss_params())
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{prefix}.loss.params: {e}") from None


def _lookup(registry, name, path):
    try:
        return registry.get_fn(name)
    except KeyError as e:
        raise ConfigError(f"{path}: {e}") from None


def _params(what, name, params, accepted, path):
    try:
        check_params(what, name, params, accepted)
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from None
