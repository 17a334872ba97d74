"""The environment registry and the types every environment uses (``envs`` re-exports them;
built-in and user environments import them from here, below the package that registers them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Union

from megatron_rl.algo.registry import Registry

ENVIRONMENTS = Registry("environment")
Observation = Union[None, str, List[int]]    # text (tokenised by the trainer) or token ids


@dataclass(frozen=True)
class StepResult:
    """What an environment returns after an action: the observation, a reward, and whether the
    episode is done."""
    observation: Observation = None
    reward: float = 0.0
    done: bool = False
    tool_call: bool = False        # this action called a tool (metrics)
    tool_error: bool = False       # ... and the tool failed (bad call, error, timeout)


class Environment:
    """Base class: subclasses take their recipe knobs as keyword-only ``__init__`` parameters
    (besides ``score``) and override ``reset`` and ``step``."""

    def __init__(self, *, score: Optional[Callable[[str], float]] = None):
        self.score = score

    def reset(self, row) -> Observation:
        """Start an episode for the dataset row ``row`` (``data.prompts.PromptRow``); returns an
        observation placed after the prompt (None: the prompt is the whole context)."""
        self.row = row
        return None

    def step(self, action: str) -> StepResult:
        """React to the LLM's ``action`` text (subclasses implement it)."""
        raise NotImplementedError

    def final_reward(self) -> float:
        """The episode's reward at its end (0 unless a subclass scores it)."""
        return 0.0
