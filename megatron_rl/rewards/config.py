"""The ``reward`` config section: which registered reward function scores responses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

from megatron_rl.algo.registry import check_params, keyword_params
from megatron_rl.fields import ConfigError, field_
from megatron_rl.rewards import Component, REWARDS
from megatron_rl.rewards.user import is_user_reward, register_user_reward


@dataclass
class RewardComponentConfig:
    """One weighted component of a composite reward."""
    name: str = field_("exact_match", help="a built-in reward or path/to/file.py:fn")
    weight: float = field_(1.0, help="its factor in the sum")
    params: Dict[str, Any] = field_(default_factory=dict, help="keyword arguments of the reward")


@dataclass
class RewardConfig:
    """The ``reward`` section: the reward function (or components), its parameters and failure
    policy."""
    name: str = field_("exact_match", help="a built-in reward, or your own: path/to/file.py:fn "
                                           "or package.module:fn (rewards/user.py: our signature "
                                           "or verl's compute_score)")
    params: Dict[str, Any] = field_(default_factory=dict, help="keyword arguments of the reward, "
                                    "checked against its signature at load")
    failure_score: float = field_(0.0, help="score of a response whose reward raised")
    workers: int = field_(1, ge=1, help="threads scoring responses (sandboxed code rewards)")
    components: List[RewardComponentConfig] = field_(
        default_factory=list, help="a weighted sum of rewards instead of reward.name, e.g. "
        "[{name: math_verify, weight: 1.0}, {name: format, weight: 0.2}]; each part is logged as "
        "reward/<name>/mean")

    def component_list(self) -> List[Any]:
        """``rewards.Component`` s of ``components``, each labelled by its name (a user
        reward's function name), numbered when names repeat."""
        labels = [c.name.rpartition(":")[2] for c in self.components]
        out = []
        for i, (c, lab) in enumerate(zip(self.components, labels)):
            if labels.count(lab) > 1:
                lab = f"{lab}{labels[:i].count(lab)}"
            out.append(Component(c.name, float(c.weight), dict(c.params), lab))
        return out

    def check(self, prefix: str = "reward") -> None:
        """``ConfigError`` for an unknown reward or parameters it does not take."""
        if not self.components:
            _check_one(self.name, self.params, prefix)
            return
        if self.params:
            raise ConfigError(f"{prefix}.params: set with {prefix}.components, which replace "
                              f"{prefix}.name; give each component its own params")
        for i, c in enumerate(self.components):
            _check_one(c.name, c.params, f"{prefix}.components[{i}]")


def _check_one(name: str, params: Dict[str, Any], prefix: str) -> None:
    try:
        fn = register_user_reward(name) if is_user_reward(name) else REWARDS.get_fn(name)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{prefix}.name: {e}") from None
    try:
        check_params("reward", name, params, keyword_params(fn, skip=("prompt", "metadata")))
    except TypeError as e:
        raise ConfigError(f"{prefix}.params: {e}") from None
