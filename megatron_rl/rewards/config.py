"""The ``reward`` config section: which registered reward function scores responses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

from megatron_rl.config.fields import ConfigError, field_


@dataclass
class RewardConfig:
    name: str = "exact_match"
    params: Dict[str, Any] = field(default_factory=dict)
    failure_score: float = field_(0.0, help="score of a response whose reward raised")
    workers: int = field_(1, ge=1, help="threads scoring responses (sandboxed code rewards)")

    def check(self, prefix: str = "reward") -> None:
        from megatron_rl.algo.registry import check_params, keyword_params
        from megatron_rl.rewards import REWARDS

        try:
            fn = REWARDS.get_fn(self.name)
        except KeyError as e:
            raise ConfigError(f"{prefix}.name: {e}") from None
        try:
            check_params("reward", self.name, self.params, keyword_params(fn, skip=("prompt", "metadata")))
        except TypeError as e:
            raise ConfigError(f"{prefix}.params: {e}") from None
