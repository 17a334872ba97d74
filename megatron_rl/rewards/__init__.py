"""Reward functions: a registry with one signature, and a runner that never lets one crash a step.

A reward is ``fn(response: str, label, *, prompt: str = "", metadata: dict | None = None,
**params) -> float`` (keyword-only ``params`` are its recipe knobs). ``score`` runs one and
returns a ``RewardResult``: a reward that raises scores ``failure_score`` and keeps the error.
``score_components`` runs a weighted sum of several and keeps each part.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any, Dict, Optional

from megatron_rl.algo.registry import Registry, check_params, keyword_params

REWARDS = Registry("reward function")


@dataclass(frozen=True)
class RewardResult:
    score: float
    error: Optional[str] = None
    parts: Optional[Dict[str, float]] = None   # each component's score (reward.components)


@dataclass(frozen=True)
class Component:
    """One weighted term of a combined reward; ``label`` names its metrics."""

    name: str
    weight: float
    params: Dict[str, Any]
    label: str


def score_components(components, response: str, label: Any, *, prompt: str = "",
                     metadata: Optional[Dict[str, Any]] = None,
                     failure_score: float = 0.0) -> RewardResult:
    """``sum(weight * score)`` over ``components`` (TRL's ``reward_funcs`` + ``reward_weights``),
    each scored by ``score`` (a failing one scores ``failure_score``), with every part kept."""
    total, parts, error = 0.0, {}, None
    for c in components:
        r = score(c.name, response, label, prompt=prompt, metadata=metadata,
                  failure_score=failure_score, **c.params)
        parts[c.label] = r.score
        total += c.weight * r.score
        error = error or (r.error and f"{c.label}: {r.error}")
    return RewardResult(total, error, parts)


def score(name: str, response: str, label: Any, *, prompt: str = "",
          metadata: Optional[Dict[str, Any]] = None, failure_score: float = 0.0,
          **params) -> RewardResult:
    fn = REWARDS.get_fn(name)
    check_params("reward", name, params, keyword_params(fn, skip=("prompt", "metadata")))
    try:
        value = float(fn(response, label, prompt=prompt, metadata=metadata or {}, **params))
    except Exception as e:  # noqa: BLE001 -- any failure of user reward code is data, not a crash
        return RewardResult(failure_score, f"{type(e).__name__}: {e}"[:500])
    if not math.isfinite(value):  # one NaN / Inf would turn the whole group's advantages to NaN
        return RewardResult(failure_score, f"reward returned {value}")
    return RewardResult(value)


from megatron_rl.rewards import builtin  # noqa: E402,F401  (registers the built-ins)
