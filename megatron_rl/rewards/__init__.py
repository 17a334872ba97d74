"""Reward functions: a registry with one signature, and a runner that never lets one crash a step.

A reward is ``fn(response: str, label, *, prompt: str = "", metadata: dict | None = None,
**params) -> float`` (keyword-only ``params`` are its recipe knobs). ``score`` runs one and
returns a ``RewardResult``: a reward that raises scores ``failure_score`` and keeps the error.
``score_components`` runs a weighted sum of several and keeps each part. A rollout ``bind`` s
each reward once (lookup and parameter check) and then ``run`` s / ``combine`` s per response.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from megatron_rl.algo.registry import check_params, keyword_params
from megatron_rl.rewards.base import REWARDS


@dataclass(frozen=True)
class RewardResult:
    """A response's score, the error that replaced it (if any), and each component's score.
    ``score`` None: a reward service could not score it (its group is skipped, never zeroed)."""
    score: Optional[float]
    error: Optional[str] = None
    parts: Optional[Dict[str, float]] = None   # each component's score (reward.components)


@dataclass(frozen=True)
class Component:
    """One weighted term of a combined reward; ``label`` names its metrics."""

    name: str
    weight: float
    params: Dict[str, Any]
    label: str


def bind(name: str, **params) -> Callable[..., Any]:
    """The reward ``name`` with ``params`` checked against its signature once (a rollout calls it
    for every response): ``fn(response, label, prompt=..., metadata=...)``."""
    fn = REWARDS.get_fn(name)
    check_params("reward", name, params, keyword_params(fn, skip=("prompt", "metadata")))
    return functools.partial(fn, **params) if params else fn


def run(fn: Callable[..., Any], response: str, label: Any, *, prompt: str = "",
        metadata: Optional[Dict[str, Any]] = None, failure_score: float = 0.0) -> RewardResult:
    """One bound reward on one response; a raise or a non-finite value scores ``failure_score``
    with the reason kept."""
    try:
        value = float(fn(response, label, prompt=prompt, metadata=metadata or {}))
    except Exception as e:  # noqa: BLE001 -- any failure of user reward code is data, not a crash
        return RewardResult(failure_score, f"{type(e).__name__}: {e}"[:500])
    if not math.isfinite(value):  # one NaN / Inf would turn the whole group's advantages to NaN
        return RewardResult(failure_score, f"reward returned {value}")
    return RewardResult(value)


SERVICE_TERM = "service"   # a term of ``combine`` scored by a service in batches (``service=``)
MODEL_TERM = "model"       # the learned reward model's term: added on the trainer after the merge


def combine(terms, response: str, label: Any, *, prompt: str = "",
            metadata: Optional[Dict[str, Any]] = None, failure_score: float = 0.0,
            service: Optional[RewardResult] = None) -> RewardResult:
    """``sum(weight * score)`` over ``terms`` = ``(label, weight, bound fn)`` (TRL's
    ``reward_funcs`` + ``reward_weights``); a failing term scores ``failure_score``; every part kept.
    A ``SERVICE_TERM`` term takes ``service`` (the service's result for this response); when that
    has no score, neither has the sum. A ``MODEL_TERM`` term is left out here: the trainer adds
    it (``rollout.scoring.add_model_scores``)."""
    total, parts, error = 0.0, {}, None
    for name, weight, fn in terms:
        if fn == MODEL_TERM:
            continue
        if fn == SERVICE_TERM:
            if service is None or service.score is None:
                return RewardResult(None, f"{name}: {service.error if service else 'not scored'}")
            r = service
        else:
            r = run(fn, response, label, prompt=prompt, metadata=metadata,
                    failure_score=failure_score)
        parts[name] = r.score
        total += weight * r.score
        error = error or (r.error and f"{name}: {r.error}")
    return RewardResult(total, error, parts)


def score_components(components, response: str, label: Any, *, prompt: str = "",
                     metadata: Optional[Dict[str, Any]] = None,
                     failure_score: float = 0.0) -> RewardResult:
    """``combine`` over ``rewards.Component`` s, each bound here (one-off use; a rollout binds once)."""
    terms = [(c.label, c.weight, bind(c.name, **c.params)) for c in components]
    return combine(terms, response, label, prompt=prompt, metadata=metadata,
                   failure_score=failure_score)


def score(name: str, response: str, label: Any, *, prompt: str = "",
          metadata: Optional[Dict[str, Any]] = None, failure_score: float = 0.0,
          **params) -> RewardResult:
    """One response scored by the reward ``name`` (one-off use; a rollout binds once)."""
    return run(bind(name, **params), response, label, prompt=prompt, metadata=metadata,
               failure_score=failure_score)


from megatron_rl.rewards import builtin  # noqa: E402,F401  (registers the built-ins)
