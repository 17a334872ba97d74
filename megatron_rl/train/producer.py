"""A step's rollouts: prompts drawn, sharded over the vLLM engines, generated (or played as
multi-turn episodes), scored, and merged in draw order. The one place that does it, for both
placements: colocated (every rank an engine rank and a trainer rank) and separate (engine ranks
only, ``train.engine_worker``).
"""

from __future__ import annotations

from typing import Optional

from megatron_rl.model.cpu_modes import cpu_modes_suspended
from megatron_rl.parallel.weight_comm import all_gather_objects
from megatron_rl.rewards.http import ServiceDown
from megatron_rl.rewards.learned import shape_scores
from megatron_rl.rollout.collect import (collect_rollouts, merge_engine_parts, Rollouts,
                                         SamplingPlan, score_groups)
from megatron_rl.rollout.scoring import add_model_scores


def sampling_plan(cfg, eos_token_id: int) -> SamplingPlan:
    """The step's ``SamplingPlan`` from the root config (DAPO refill and overlong shaping)."""
    return SamplingPlan(
        groups_needed=cfg.train.prompts_per_step, n=cfg.rollout.n_samples_per_prompt,
        max_tokens=cfg.rollout.max_response_len, temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p, stop_token_ids=(eos_token_id,), ignore_eos=cfg.rollout.ignore_eos,
        dynamic=cfg.algo.dynamic_sampling, oversample=cfg.rollout.oversample,
        max_rounds=cfg.rollout.max_sample_rounds, overlong_buffer=cfg.algo.overlong.buffer_len,
        overlong_factor=cfg.algo.overlong.penalty_factor)


class RolloutProducer:
    """Generates and scores a step's rollouts on this rank's engine. ``rank`` / ``engine_tp``
    are in the world the engines share (the whole job colocated, the engine ranks separate)."""

    def __init__(self, cfg, tok, prompts, scorer, episodes, rank: int, world: int,
                 route_stash=None, reward_model=None):
        self.cfg, self.tok, self.prompts, self.scorer = cfg, tok, prompts, scorer
        self.episodes, self.route_stash = episodes, route_stash
        self.reward_model = reward_model   # train.reward_model.RewardModel: scores after the merge
        self.engine_tp = cfg.rollout.tensor_parallel_size
        self.engine_index, self.n_engines = rank // self.engine_tp, world // self.engine_tp
        self.leader = rank % self.engine_tp == 0    # one rank per engine scores and reports
        self.engine = None

    def collect(self, step: int) -> Rollouts:
        """Step ``step``'s rollouts (every engine rank calls it: the merge is collective)."""
        plan = sampling_plan(self.cfg, self.tok.eos_token_id)
        rounds = iter(range(1_000_000))
        return collect_rollouts(self.prompts.draw,
                                lambda drawn: self.sample(drawn, plan, next(rounds), step), plan)

    @cpu_modes_suspended()   # generation and rewards: no Megatron in them
    def sample(self, drawn, plan: SamplingPlan, round_: int, step: int, validation: bool = False):
        """This engine's share of ``drawn`` generated and scored (multi-turn: played and scored by
        the environment), then everyone's, in draw order, then the reward model's scores added
        on every rank (``validation``: its normaliser is not updated)."""
        mine = drawn[self.engine_index::self.n_engines]
        seed = ((self.cfg.rollout.seed * 1_000_003 + step) * 1009 + round_) * 131 + self.engine_index
        parts: dict = {}   # reward components' sums (multi-turn episodes log their own metrics)
        scores: Optional[list] = None
        failures, error, fatal = 0, "", ""
        if self.episodes is not None:
            groups, scores, failures, error = self.episodes.collect(self.engine, mine, plan.n, seed)
        else:
            groups = self.engine.generate(
                [ids for _, ids in mine], n=plan.n, max_tokens=plan.max_tokens,
                temperature=plan.temperature, top_p=plan.top_p, seed=seed,
                stop_token_ids=plan.stop_token_ids, ignore_eos=plan.ignore_eos) if mine else []
            if self.leader:
                try:
                    scores, failures, error, parts = score_groups(
                        self.scorer, [r for r, _ in mine], groups)
                except ServiceDown as e:   # every rank learns it in the merge, and stops
                    fatal = str(e)
                    scores = [[None] * len(g) for g in groups]
        if self.route_stash is not None and self.leader:   # routes go only where trained on
            self.route_stash.stash(groups, round_, range(self.engine_index, len(drawn), self.n_engines))
        service = self.scorer.service.take_stats() if self.scorer.service is not None else {}
        payload = ((self.engine_index, groups, scores, failures, error, parts, service, fatal)
                   if self.leader else None)
        merged = merge_engine_parts(all_gather_objects(payload), len(drawn), self.n_engines)
        if self.reward_model is None or merged[-1]:   # none, or the reward service is down
            return merged
        return self._add_model_scores([r for r, _ in drawn], merged, validation)

    def _add_model_scores(self, rows, merged, validation: bool):
        """The merged parts with the reward model's term in the scores, its failures counted and
        its raw scores appended (collective: every trainer rank)."""
        groups, scores, failures, error, sums, service, fatal = merged
        rm = self.reward_model
        scores, more, first, raw = add_model_scores(
            rm, rows, groups, scores, weight=rm.weight, decode=self.scorer.decode,
            shape=lambda x: shape_scores(x, rm.moments, rm.clip, update=not validation),
            failure_score=self.scorer.failure_score)
        return groups, scores, failures + more, error or first, sums, service, fatal, raw
