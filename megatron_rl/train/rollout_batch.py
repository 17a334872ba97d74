"""A step's rollouts (every engine's, on every rank) -> this data-parallel rank's ``StepBatch``.

Every DP rank trains on the same number of whole groups: rank ``r`` takes the ``r``-th contiguous
share of the kept groups. The samples' token ids, log-probs and scores reach every rank (one
all-gather), but their expert routes are the bulk of a step (Qwen3-30B-A3B: 768 bytes a token,
6.3 MB an 8k-token response) and do not: the engine's leading rank keeps them (``RouteStash``) and
sends each group's only to the ranks that train on it (``parallel.rollout_comm.scatter_by_key``).
They travel with their sequences into the micro-batches (``train.batches``) and are dropped from
the samples there, so a rank holds its own share of a step's routes, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_rl.algo.advantages import PER_POSITION_ESTIMATORS
from megatron_rl.parallel.groups import ParallelGroups
from megatron_rl.parallel.rollout_comm import scatter_by_key
from megatron_rl.rollout.collect import Rollouts
from megatron_rl.train.batch_plan import (BatchPlan, Cost, fixed_plan, merged_passes,
                                          micro_batch_cost, plan_step)
from megatron_rl.train.rl_batch import StepBatch, build_step_batch, group_sequences, update_slices


@dataclass(frozen=True)
class BatchShape:
    """How the step's groups become micro-batches on this rank (plain numbers from the config)."""

    dp: int
    dp_rank: int
    groups_per_micro_batch: int
    cp_size: int
    cp_rank: int
    packed: bool
    advantage: str
    route_shape: Optional[Sequence[int]] = None    # (MoE layers, top-k): the engine sent routes
    route_layers: Optional[Sequence[int]] = None   # this stage's MoE layers (None: no routers)
    replay_rollout_routes: bool = False            # train.routing_replay=rollout
    max_tokens: int = 0            # train.max_tokens_per_micro_batch (0: fixed group counts)
    updates: int = 1               # train.updates_per_step: the token-budget plan is per update
    tp_size: int = 1               # sequences are padded to a multiple of 2 cp tp
    logprob_max_tokens: int = 0    # train.logprob_max_tokens_per_micro_batch (0: training's)


class RouteStash:
    """The expert routes of the groups this rank's engine sampled, by ``(round, draw index)``,
    until ``fetch`` sends them where they are trained on. ``sources``: every engine's leading rank
    (the one that reports its samples)."""

    def __init__(self, sources: Sequence[int]):
        self.sources = list(sources)
        self.held: Dict[tuple, List] = {}

    def stash(self, groups: Sequence[Sequence], round_: int, positions: Sequence[int]) -> None:
        """Take the routes out of ``groups`` (drawn at ``positions`` of round ``round_``) before
        they are gathered: each sample keeps a ``route_key``."""
        for group, pos in zip(groups, positions):
            key = (round_, pos)
            if any(s.routed_experts is not None for s in group):
                self.held[key] = [s.routed_experts for s in group]
            for s in group:
                s.route_key, s.routed_experts = key, None

    def fetch(self, groups: Sequence[Sequence]) -> None:
        """Put back the routes of ``groups`` (this rank's share of the step), from whichever
        engine holds them; collective over the world (every rank calls it each step), after
        which nothing is held."""
        wanted = sorted({s.route_key for g in groups for s in g if s.route_key is not None})
        got = scatter_by_key(self.held, wanted, self.sources)
        self.held = {}
        for group in groups:
            routes = got.get(group[0].route_key)
            for g, s in enumerate(group):
                s.routed_experts = None if routes is None else routes[g]


def step_batch(rollouts: Rollouts, shape: BatchShape, pg: ParallelGroups, device,
               stash: Optional[RouteStash] = None) -> Optional[StepBatch]:
    """This rank's micro-batches of ``rollouts`` (None when there are fewer groups than DP ranks),
    with their routes from ``stash`` (collective when given). Drops every sample's routes
    afterwards (host memory stays bounded by this rank's share of one step)."""
    plan, update_sizes, cost = _plan(rollouts, shape)
    idx = sorted(g for mb in plan.ranks[shape.dp_rank] for g in mb)
    if stash is not None:   # a stage without routers (dense layers only) asks for none
        stash.fetch([rollouts.samples[i] for i in idx] if shape.route_layers is not None else [])
    batch = None
    if idx:
        with_routes = shape.route_shape if shape.route_layers is not None else None
        groups = [group_sequences(rollouts.samples[i][0].prompt_ids, rollouts.samples[i],
                                  route_shape=with_routes) for i in idx]
        local = {g: j for j, g in enumerate(idx)}
        batch = build_step_batch(
            groups, [rollouts.rewards[i] for i in idx], shape.groups_per_micro_batch, pg,
            cp_size=shape.cp_size, cp_rank=shape.cp_rank, packed=shape.packed, device=device,
            advantage=shape.advantage, route_layers=shape.route_layers if with_routes else None,
            replay_rollout_routes=shape.replay_rollout_routes,
            bins=[[local[g] for g in mb] for mb in plan.ranks[shape.dp_rank]])
        batch.update_sizes = update_sizes
        batch.plan_metrics = plan.metrics()
        if shape.logprob_max_tokens:
            merges = merged_passes([[cost(mb) for mb in r] for r in plan.ranks],
                                   shape.logprob_max_tokens)
            batch.logprob_bins = merges[shape.dp_rank]
            batch.plan_metrics["batch/logprob_micro_batches"] = float(len(merges[0]))
    for group in rollouts.samples:
        for s in group:
            s.routed_experts = None
    return batch


def _plan(rollouts: Rollouts, shape: BatchShape) -> Tuple[BatchPlan, Optional[List[int]], Cost]:
    """Every rank's micro-batches of the step's groups (``batch_plan``), the same on every rank,
    the micro-batches per update (None: ``rl_batch.update_slices`` cuts them evenly) and the
    laid-out tokens of a micro-batch (``batch_plan.micro_batch_cost``).

    Fixed counts: rank ``r`` takes the ``r``-th contiguous share, cut into runs of
    ``groups_per_micro_batch``. Token budget: the kept groups (a multiple of ``dp``, as there)
    are cut into ``updates`` contiguous mini-batches (multiples of ``dp``, sizes as even as
    possible), each balanced over the DP ranks and packed on its own, so that an update trains
    on the same groups whatever the layout."""
    lengths = [[len(s.prompt_ids) + len(s.token_ids) for s in group] for group in rollouts.samples]
    cost = micro_batch_cost(lengths, packed=shape.packed, cp_size=shape.cp_size,
                            align_groups=shape.advantage in PER_POSITION_ESTIMATORS,
                            tp_size=shape.tp_size)
    if not shape.max_tokens:
        return fixed_plan(lengths, shape.dp, shape.groups_per_micro_batch, cost), None, cost
    weights = [sum(ls) for ls in lengths]
    units = len(lengths) // shape.dp      # rounds of one group per DP rank (as the fixed path)
    plans = [plan_step(range(r.start * shape.dp, r.stop * shape.dp), weights, shape.dp,
                       shape.max_tokens, cost)
             for r in update_slices(units, shape.updates)] if units else []
    if not plans:
        return fixed_plan(lengths[:0], shape.dp, 1, cost), None, cost
    return BatchPlan.concat(plans), [len(p.ranks[0]) for p in plans], cost
