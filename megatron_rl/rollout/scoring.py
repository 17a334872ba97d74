"""How a response is scored: a reward from the registry (or a weighted sum of components), with
how its tokens become text. The single-turn collector and the multi-turn episode runner both use
it, so it sits below both."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Dict, List

from megatron_rl.data.prompts import PromptRow
from megatron_rl.rewards import bind, combine, run


@dataclass(frozen=True)
class Scorer:
    """A reward from the registry plus how responses become text."""

    name: str
    params: Dict[str, Any]
    decode: Callable[[List[int]], str]
    failure_score: float = 0.0
    workers: int = 1
    components: tuple = ()          # rewards.Component s: a weighted sum instead of ``name``

    @classmethod
    def of(cls, reward, tokenizer) -> "Scorer":
        """From the ``reward`` config section; responses decoded without special tokens."""
        return cls(reward.name, dict(reward.params),
                   lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                   reward.failure_score, reward.workers, tuple(reward.component_list()))

    @cached_property
    def _bound(self):
        """The reward(s) looked up and their parameters checked once, not per response."""
        if self.components:
            return tuple((c.label, c.weight, bind(c.name, **c.params)) for c in self.components)
        return bind(self.name, **self.params)

    def __call__(self, response: str, row: PromptRow):
        prompt = row.prompt if isinstance(row.prompt, str) else str(row.prompt)
        kw = dict(prompt=prompt, metadata=row.metadata, failure_score=self.failure_score)
        if self.components:
            return combine(self._bound, response, row.label, **kw)
        return run(self._bound, response, row.label, **kw)
