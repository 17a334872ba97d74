"""How a response is scored: a reward from the registry (or a weighted sum of components), with
how its tokens become text. The single-turn collector and the multi-turn episode runner both use
it, so it sits below both."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Dict, List, Optional

from megatron_rl.data.prompts import PromptRow
from megatron_rl.rewards import bind, combine, RewardResult, run, SERVICE_TERM
from megatron_rl.rewards.config import SERVICE_REWARDS
from megatron_rl.rewards.http import HttpReward, Item


@dataclass(frozen=True)
class Scorer:
    """A reward from the registry plus how responses become text; ``service`` (``reward.http``)
    scores its part of every response in one batch first (``score_service``)."""

    name: str
    params: Dict[str, Any]
    decode: Callable[[List[int]], str]
    failure_score: float = 0.0
    workers: int = 1
    components: tuple = ()          # rewards.Component s: a weighted sum instead of ``name``
    service: Optional[HttpReward] = None

    @classmethod
    def of(cls, reward, tokenizer) -> "Scorer":
        """From the ``reward`` config section; responses decoded without special tokens."""
        service = HttpReward(reward.http.settings()) if reward.uses_service() else None
        return cls(reward.name, dict(reward.params),
                   lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                   reward.failure_score, reward.workers, tuple(reward.component_list()), service)

    @cached_property
    def _bound(self):
        """The reward(s) looked up and their parameters checked once, not per response."""
        if self.components:
            return tuple((c.label, c.weight, SERVICE_TERM if c.name in SERVICE_REWARDS
                          else bind(c.name, **c.params)) for c in self.components)
        return SERVICE_TERM if self.name in SERVICE_REWARDS else bind(self.name, **self.params)

    def score_service(self, responses: List[str], rows: List[PromptRow]) -> List[Optional[RewardResult]]:
        """The service's result for every response (``[None] * n`` without a service); raises
        ``rewards.http.ServiceDown`` when the service is down."""
        if self.service is None:
            return [None] * len(responses)
        return self.service.score([Item(r.prompt, text, r.label, r.metadata)
                                   for text, r in zip(responses, rows)])

    def __call__(self, response: str, row: PromptRow, service: Optional[RewardResult] = None):
        prompt = row.prompt if isinstance(row.prompt, str) else str(row.prompt)
        kw = dict(prompt=prompt, metadata=row.metadata, failure_score=self.failure_score)
        if self.components:
            return combine(self._bound, response, row.label, service=service, **kw)
        if self._bound == SERVICE_TERM:
            return service
        return run(self._bound, response, row.label, **kw)
