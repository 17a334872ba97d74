"""How a response is scored: a reward from the registry (or a weighted sum of components), with
how its tokens become text. The single-turn collector and the multi-turn episode runner both use
it, so it sits below both."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_rl.data.prompts import PromptRow
from megatron_rl.rewards import bind, combine, MODEL_TERM, RewardResult, run, SERVICE_TERM
from megatron_rl.rewards.config import MODEL_REWARD, SERVICE_REWARDS
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
            return tuple((c.label, c.weight, _term(c.name, c.params)) for c in self.components)
        return _term(self.name, self.params)

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
        if self._bound == MODEL_TERM:   # the whole reward is the model's, added after the merge
            return RewardResult(0.0)
        return run(self._bound, response, row.label, **kw)


def _term(name: str, params: Dict[str, Any]):
    """A reward's place in ``rewards.combine``: a service's or the reward model's marker, or the
    bound function."""
    if name in SERVICE_REWARDS:
        return SERVICE_TERM
    return MODEL_TERM if name == MODEL_REWARD else bind(name, **params)


def add_model_scores(rm, rows: Sequence[PromptRow], groups: Sequence[Sequence[Any]],
                     scores: Sequence[Sequence[Optional[float]]], *, weight: float,
                     shape: Callable[[torch.Tensor], torch.Tensor], decode: Callable,
                     failure_score: float = 0.0) -> Tuple[List[List[Optional[float]]], int, str, List[float]]:
    """``scores [P][G]`` (every other reward's part; None: a service left it unscored) plus
    ``weight`` x the learned reward model's score of each response, shaped by ``shape``
    (normalisation and clip). ``rm``: ``token_ids(prompt, response)``, ``score_ids(seqs)``
    (collective: every trainer rank calls this with the same rollouts) and ``max_length``. A
    response longer than the model takes scores ``failure_score`` for the term and counts as a
    failure. Returns ``(scores, failures, first error, raw scores of the responses scored)``."""
    jobs = [(p, g) for p, group in enumerate(groups) for g in range(len(group))]
    ids = [rm.token_ids(rows[p].prompt, decode(groups[p][g].token_ids)) for p, g in jobs]
    fits = [j for j, x in enumerate(ids) if len(x) <= rm.max_length]
    raw = rm.score_ids([ids[j] for j in fits])
    term = dict(zip(fits, shape(raw).tolist()))
    out = [list(s) for s in scores]
    failures, error = 0, ""
    for j, (p, g) in enumerate(jobs):
        if out[p][g] is None:
            continue
        if j not in term:
            failures += 1
            error = error or (f"reward model: {len(ids[j])} tokens exceed its "
                              f"max_position_embeddings={rm.max_length}")
        out[p][g] += weight * term.get(j, failure_score)
    return out, failures, error, raw.tolist()
