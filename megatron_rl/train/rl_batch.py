"""A step's rollouts as Megatron micro-batches, their advantages, and the optimizer updates.

Legend: ``P`` groups on this rank, ``G`` responses per group, ``B`` responses of a micro-batch,
``[B, 2C]`` the sharded loss view (``parallel.loss``).

Micro-batches hold whole groups, so the per-group (and per-position) statistics of the advantage
estimators are computed inside one micro-batch, on the CP-sharded view, with no gather. An update
is a contiguous run of micro-batches (whole groups); its loss uses that update's global token and
sequence counts (``step_denominators``), so the gradient does not depend on how the update is cut
into micro-batches or ranks.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from megatron_rl.algo.advantages import PER_POSITION_ESTIMATORS, step_whitening
from megatron_rl.algo.kl import kl_estimate
from megatron_rl.algo.mismatch import mismatch_gap
from megatron_rl.parallel.groups import ParallelGroups
from megatron_rl.parallel.loss import sharded_advantages, step_denominators, step_whiten
from megatron_rl.runtime.crash_points import reached
from megatron_rl.train.batches import build_micro_batch
from megatron_rl.train.logprob_batches import merged_pass
from megatron_rl.train.megatron_loss import (PolicyLoss, PolicyMicroBatch, forward_logprobs,
                                             train_forward_backward)
from megatron_rl.train.optimizer import nonfinite_flag, optimizer_step

Tensor = torch.Tensor


@dataclass(frozen=True)
class StepPlan:
    """The algorithm's knobs for one step: registry names and plain numbers."""

    advantage: str
    advantage_params: Dict
    loss: str
    loss_params: Dict
    kl_estimator: str = "k1"
    kl_source: str = "old"                  # old | current
    kl_clamp_log_ratio: Optional[float] = None
    kl_clamp_value: Optional[float] = None
    updates: int = 1
    epochs: int = 1                         # passes over the step's batch (PPO epochs)
    seed: int = 0                           # the shuffles of epochs after the first
    temperature: float = 1.0
    needs_reference: bool = False
    routing_replay: str = "off"             # off | old (R2: the old pass's) | rollout (R3: the engine's)
    behaviour: str = "old"                  # old: the trainer's old-policy pass | rollout: the engine's
    packed: bool = False
    separate_old_pass: bool = False         # run the old-policy pass even where not needed

    @property
    def old_from_update(self) -> bool:
        """No pass has to run before the first update: the old log-probs are the engine's
        (``behaviour=rollout``), or one update covers the whole batch, whose own forward runs the
        rollout's policy so that its log-probs, detached, are the old ones (exactly). Either way
        nothing else may read them first: a reference (the KL), a critic (``gae``) or R2's
        recording of routes."""
        if self.separate_old_pass or self.needs_reference or self.routing_replay == "old" \
                or self.advantage == "gae":
            return False
        return self.behaviour == "rollout" or (self.updates == 1 and self.epochs == 1)

    @property
    def old_pass(self) -> bool:
        """The trainer runs its old-policy pass before the updates: for the old log-probs
        (``behaviour=old`` where the update cannot give them) or to record R2's routes."""
        return not self.old_from_update and (self.behaviour == "old" or self.routing_replay == "old")


@dataclass
class StepBatch:
    """A step's micro-batches on this rank with their rewards, reference log-probs and critic values."""
    micro_batches: List[PolicyMicroBatch]
    rewards: List[Tensor]                   # [B] per micro-batch, shaped
    ref: List[Optional[Tensor]]             # [B, 2C] reference log-probs per micro-batch
    has_logprobs: bool = False              # this rank computed the old log-probs (last PP stage)
    values: Optional[List[Tensor]] = None   # [B, 2C] the rollout-time critic's values (gae)
    returns: Optional[List[Tensor]] = None  # [B, 2C] the critic's targets: advantage + value
    update_sizes: Optional[List[int]] = None    # micro-batches per update (None: even cut)
    plan_metrics: Dict[str, float] = field(default_factory=dict)   # batch/* (same on every rank)
    logprob_bins: Optional[List[List[int]]] = None  # micro-batches per no-grad pass (None: one)


def group_sequences(prompt_ids: List[int], samples: Sequence,
                    route_shape: Optional[Sequence[int]] = None) -> List[Dict[str, Tensor]]:
    """One group's sequences: prompt + response tokens exactly as the engine saw them, the loss
    mask over the response's action tokens (multi-turn: the sample's ``action_mask``, 0 on
    observation tokens), and the engine's log-probs in label coordinates (row ``p`` is about
    token ``p + 1``). ``route_shape`` ``(L, K)``: the engine's expert routes too, in token
    coordinates (-1 rows where it has none: the last token, a response it returned none for)."""
    out = []
    L = len(prompt_ids)
    for s in samples:
        R = len(s.token_ids)
        tokens = torch.tensor(list(prompt_ids) + list(s.token_ids), dtype=torch.long)
        loss_mask = torch.zeros(L + R)
        actions = getattr(s, "action_mask", None)
        loss_mask[L:] = 1.0 if actions is None else torch.tensor(actions, dtype=torch.float32)
        rollout = torch.zeros(L + R)
        rollout[L - 1:L - 1 + R] = torch.tensor(s.logprobs, dtype=torch.float32) * loss_mask[L:]
        zeros = torch.zeros(L + R)
        out.append({"tokens": tokens, "loss_mask": loss_mask, "rollout_logprobs": rollout,
                    "old_logprobs": zeros, "advantages": zeros})
        if route_shape is not None:
            out[-1]["routes"] = _token_routes(getattr(s, "routed_experts", None), L + R, route_shape)
    return out


def _token_routes(payload, n: int, shape: Sequence[int]) -> Tensor:
    """``[n, L, K]`` int16: the engine's routes (``rollout.routes`` payload) where it has them,
    -1 elsewhere."""
    out = torch.full((n, *shape), -1, dtype=torch.int16)
    if payload is not None:
        rows = min(len(payload), n)
        out[:rows] = torch.as_tensor(payload[:rows], dtype=torch.int16)
    return out


def build_step_batch(groups: List[List[Dict[str, Tensor]]], rewards: List[Tensor],
                     groups_per_micro_batch: int, pg: ParallelGroups, *, cp_size: int, cp_rank: int,
                     packed: bool, device, advantage: str = "",
                     route_layers: Optional[Sequence[int]] = None,
                     replay_rollout_routes: bool = False,
                     bins: Optional[Sequence[Sequence[int]]] = None) -> StepBatch:
    """``groups[P][G]`` sequences and their ``rewards[P]`` ``[G]`` -> micro-batches of whole groups:
    the group indices of each in ``bins`` (a token-budget plan), else contiguous runs of
    ``groups_per_micro_batch``.
    An ``advantage`` with per-position group statistics gets group-aligned packed lengths
    (``batches.packed_lengths``): under CP its statistics then need no communication.
    ``route_layers``: this stage's MoE layers, when the sequences carry the engine's routes;
    ``replay_rollout_routes`` (R3) replays them in every policy forward."""
    align = advantage in PER_POSITION_ESTIMATORS
    mbs, rs = [], []
    if bins is None:
        bins = [range(start, min(start + groups_per_micro_batch, len(groups)))
                for start in range(0, len(groups), groups_per_micro_batch)]
    for chunk in bins:
        seqs = [s for g in chunk for s in groups[g]]
        gid = torch.tensor([i for i, g in enumerate(chunk) for _ in groups[g]])
        mb = build_micro_batch(seqs, gid, packed=packed, cp_size=cp_size, cp_rank=cp_rank,
                               cp_group=pg.cp, num_groups=len(chunk), align_groups=align,
                               tp_size=pg.tp_size, tp_rank=pg.tp_rank, route_layers=route_layers,
                               device=device)
        if replay_rollout_routes:
            mb.routes = mb.engine_routes
        mbs.append(mb)
        rs.append(torch.cat([rewards[g] for g in chunk]).to(device))
    return StepBatch(mbs, rs, [None] * len(mbs))


def set_advantages(batch: StepBatch, idx: Sequence[int], plan: StepPlan, pg: ParallelGroups,
                   policy_lp: Optional[List[Tensor]] = None) -> None:
    """Advantages of micro-batches ``idx`` from their rewards and the KL between ``policy_lp``
    (default: the old log-probs) and the reference. An estimator's batch-wide whitening is done
    over all of ``idx`` on every DP x CP rank (the step; with ``kl_source=current``, the update)."""
    params, whiten = step_whitening(plan.advantage, plan.advantage_params)
    advs = []
    values = batch.values
    for j, i in enumerate(idx):
        mb = batch.micro_batches[i]
        kl = None
        if batch.ref[i] is not None:
            lp = mb.old_logprobs if policy_lp is None else policy_lp[j]
            kl = kl_estimate(lp, batch.ref[i], plan.kl_estimator, mask=mb.shard.mask,
                             clamp_log_ratio=plan.kl_clamp_log_ratio,
                             clamp_value=plan.kl_clamp_value)
        advs.append(sharded_advantages(plan.advantage, mb.shard, rewards=batch.rewards[i], kl=kl,
                                       values=None if values is None else values[i],
                                       **params).detach())
        if values is not None:  # the critic's target is the return before whitening: A + V_old
            batch.returns[i] = (advs[-1] + values[i]) * mb.shard.mask
    if whiten:
        advs = step_whiten(advs, [batch.micro_batches[i].shard for i in idx], pg.dp_cp)
    for i, adv in zip(idx, advs):
        batch.micro_batches[i].advantages = adv


def logprob_passes(model: List, batch: StepBatch, pg: ParallelGroups, plan: StepPlan,
                   reference=None, router_load=None, critic=None) -> None:
    """The behaviour policy's log-probs (the old-policy pass, recording expert routes for R2; or
    the engine's, ``behaviour=rollout``), the reference log-probs when the algorithm uses a KL,
    the critic's values (PPO), then the advantages. Results on the last pipeline stage only; the
    other stages keep placeholders (they never compute a loss)."""
    from megatron.core import parallel_state as ps

    if plan.behaviour == "rollout":
        for mb in batch.micro_batches:
            mb.old_logprobs = mb.rollout_logprobs
    elif plan.old_from_update:
        _old_from_update(batch, plan, pg, critic)
        return
    batch.has_logprobs = ps.is_pipeline_last_stage(ignore_virtual=True)
    if plan.old_pass:
        record = plan.routing_replay == "old"
        with router_load.counting() if router_load is not None else contextlib.nullcontext():
            old = _no_grad_pass(batch, pg, lambda mbs: forward_logprobs(
                model, mbs, pg, measure=True, record_routes=record, temperature=plan.temperature),
                record_routes=record, measure=True)
        if plan.behaviour == "old":
            for mb, lp in zip(batch.micro_batches, old):
                mb.old_logprobs = lp
    # every pipeline stage runs each pass (the schedule is collective); the last keeps the results
    if plan.needs_reference:
        with reference.swapped_in():
            # the reference routes its own tokens: the replayed routes are the policy's
            ref = _no_grad_pass(batch, pg, lambda mbs: forward_logprobs(
                model, mbs, pg, replay_routes=False, temperature=plan.temperature))
        if batch.has_logprobs:
            batch.ref = ref
            for mb, r in zip(batch.micro_batches, ref):
                mb.ref_logprobs = r
    if critic is not None:
        values = _no_grad_pass(batch, pg, critic.values)
        if batch.has_logprobs:
            batch.values, batch.returns = values, [torch.zeros_like(v) for v in values]
    if batch.has_logprobs:
        set_advantages(batch, range(len(batch.micro_batches)), plan, pg)


def _no_grad_pass(batch: StepBatch, pg: ParallelGroups, run, **kw) -> List[Tensor]:
    """``run`` (a forward-only pass) over the step's micro-batches, or over the larger ones of
    ``batch.logprob_bins`` with its results cut back (``logprob_batches.merged_pass``)."""
    if batch.logprob_bins is None:
        return run(batch.micro_batches)
    return merged_pass(run, batch.micro_batches, batch.logprob_bins, pg, **kw)


def _old_from_update(batch: StepBatch, plan: StepPlan, pg: ParallelGroups, critic) -> None:
    """``plan.old_from_update``: the loss fills each micro-batch's old log-probs from the update's
    forward (``megatron_loss._loss_func``); the advantages need none of them."""
    from megatron.core import parallel_state as ps

    if critic is not None:
        raise ValueError("a critic reads the old log-probs before the update (advantage 'gae')")
    for mb in batch.micro_batches:
        mb.old_logprobs = None
    batch.has_logprobs = ps.is_pipeline_last_stage(ignore_virtual=True)
    if batch.has_logprobs:
        set_advantages(batch, range(len(batch.micro_batches)), plan, pg)


def update_slices(n_micro_batches: int, updates: int,
                  sizes: Optional[Sequence[int]] = None) -> List[range]:
    """``updates`` contiguous runs of micro-batches, sizes differing by at most one; or runs of
    the given ``sizes`` (a token-budget plan's micro-batches per update)."""
    if sizes is not None:
        starts = [0] + list(itertools.accumulate(sizes))
        return [range(a, b) for a, b in zip(starts[:-1], starts[1:])]
    k = min(updates, n_micro_batches)
    base, extra = divmod(n_micro_batches, k)
    out, start = [], 0
    for u in range(k):
        size = base + (u < extra)
        out.append(range(start, start + size))
        start += size
    return out


def epoch_orders(n_micro_batches: int, epochs: int, seed: int, step: int) -> List[List[int]]:
    """The micro-batch order of each epoch: the first keeps the batch's order, each later one is
    a permutation drawn from ``(seed, step, epoch)`` alone, so every rank draws the same one and a
    step restarted after a crash replays it. Micro-batches hold whole groups: shuffling them
    shuffles groups."""
    orders = [list(range(n_micro_batches))]
    for e in range(1, epochs):
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + e)
        orders.append(torch.randperm(n_micro_batches, generator=g).tolist())
    return orders


def run_updates(model: List, optimizer, scheduler, batch: StepBatch, pg: ParallelGroups,
                plan: StepPlan, step: int = 0, critic=None, train_policy: bool = True,
                router_load=None) -> Dict[str, Tensor]:
    """``plan.epochs`` passes over the step's micro-batches, each cut into ``plan.updates``
    optimizer updates; the old log-probs and advantages stay those of the rollout (``kl_source=
    current`` recomputes the KL before every update but the first). With a ``critic`` (PPO), a
    critic update on the same micro-batches follows each policy update (``train_policy=False``:
    the critic's alone, its warm-up). Returns this rank's partial metric sums (tensors; reduce
    with ``reduce_metrics``): the mean over all updates, and with several epochs each epoch's
    mean as ``train/epoch<k>/...``. Without an old-policy pass (``plan.old_pass``) the update's
    forward counts the expert loads (``router_load``) and the first update measures the
    train/inference gap and the routers' agreement with the engine."""
    count = router_load is not None and not plan.old_pass
    sums: Dict[str, Tensor] = {}
    n_updates, skipped = 0, 0.0
    orders = epoch_orders(len(batch.micro_batches), plan.epochs, plan.seed, step)
    slices = update_slices(len(batch.micro_batches), plan.updates, batch.update_sizes)
    total = len(orders) * len(slices)
    for epoch, order in enumerate(orders):
        if epoch > 0:
            reached("train.epoch", step)
        for idx in ([order[i] for i in sl] for sl in slices):
            if n_updates > 0 and plan.kl_source == "current" and plan.needs_reference:
                current = forward_logprobs(model, [batch.micro_batches[i] for i in idx], pg,
                                           temperature=plan.temperature)
                if current:
                    set_advantages(batch, idx, plan, pg, current)
            if train_policy:
                # no old pass ran: the first update's forward is at the rollout's weights
                measure = not plan.old_pass and n_updates == 0 and epoch == 0
                with router_load.counting() if count else contextlib.nullcontext():
                    row = _one_update(model, optimizer, scheduler, batch, idx, pg, plan, measure)
                skipped += row.pop("skipped_updates")
                for k, v in row.items():
                    sums[f"train/{k}"] = sums.get(f"train/{k}", 0.0) + v / total
                    if plan.epochs > 1:
                        key = f"train/epoch{epoch + 1}/{k}"
                        sums[key] = sums.get(key, 0.0) + v / len(slices)
                n_updates += 1
            if critic is not None:
                for k, v in critic.update(batch, idx).items():
                    add = v if k.endswith("skipped_updates") else v / total
                    sums[k] = sums.get(k, 0.0) + add
    sums["train/skipped_updates"] = skipped
    sums["train/updates"] = torch.tensor(float(n_updates))
    return sums


def _one_update(model: List, optimizer, scheduler, batch: StepBatch, idx: Sequence[int],
                pg: ParallelGroups, plan: StepPlan, measure: bool = False) -> Dict[str, Tensor]:
    """One optimizer update over micro-batches ``idx``: this rank's partial loss metrics (summed
    over them), the gradient norm and whether the update was skipped."""
    mbs = [batch.micro_batches[i] for i in idx]
    num_tokens, num_seqs = step_denominators([m.shard for m in mbs], pg.dp_cp)
    for chunk in model:
        chunk.zero_grad_buffer()
    loss = PolicyLoss(plan.loss, plan.loss_params, num_tokens, num_seqs, plan.temperature)
    logged = train_forward_backward(model, mbs, loss, pg, measure=measure)
    bad = nonfinite_flag(model, [row["loss"] for row in logged])
    applied, grad_norm, _ = optimizer_step(optimizer, scheduler, bad, torch.distributed.group.WORLD)
    out: Dict[str, Tensor] = {}
    for row in logged:
        for k, v in row.items():
            out[k] = out.get(k, 0.0) + v.float()
    out["grad_norm"] = torch.tensor(float(grad_norm or 0.0))
    out["skipped_updates"] = torch.tensor(float(not applied))
    return out


def advantage_sums(batch: StepBatch) -> Dict[str, Tensor]:
    """The step's advantages over action tokens as partial sums (``step_metrics.derive`` turns
    them into ``advantage/mean``, ``std``, ``min``, ``max``); nothing off the last PP stage."""
    if not batch.has_logprobs:
        return {}
    a = [(mb.advantages.double() * mb.shard.mask, mb.shard.mask.double()) for mb in batch.micro_batches]
    big = torch.tensor(float("inf"), dtype=torch.float64)
    return {"advantage/sum": sum(x.sum() for x, _ in a), "advantage/sumsq": sum((x * x).sum() for x, _ in a),
            "advantage/tokens": sum(m.sum() for _, m in a),
            "advantage/max": torch.stack([torch.where(m > 0, x, -big).max() for x, m in a]).max(),
            "advantage/neg_min/max": torch.stack([torch.where(m > 0, -x, -big).max()
                                                  for x, m in a]).max()}


def mismatch_sums(batch: StepBatch) -> Dict[str, Tensor]:
    """Train/inference mismatch on this step's action tokens, as partial sums on the device: the
    trainer's log-probs at the rollout's weights (where a pass measured them) against the
    engine's: ``|difference|`` (``mismatch/mean``), the k1 and k3 estimates of KL(engine ||
    trainer) per token (``mismatch/k1``, ``mismatch/k3``) and the largest per-token values
    (``mismatch/max``, ``mismatch/k3/max``). Only the last pipeline stage has the trainer's
    log-probs: the others add nothing."""
    rows = [(mismatch_gap(mb.trainer_logprobs.double(), mb.rollout_logprobs.double(),
                          mb.shard.mask.double()), mb.shard.mask.double())
            for mb in batch.micro_batches
            if mb.trainer_logprobs is not None and mb.rollout_logprobs is not None]
    if not batch.has_logprobs or not rows:
        return {}
    return {"mismatch/abs_sum": sum(g["abs"].sum() for g, _ in rows),
            "mismatch/k1_sum": sum(g["k1"].sum() for g, _ in rows),
            "mismatch/k3_sum": sum(g["k3"].sum() for g, _ in rows),
            "mismatch/tokens": sum(m.sum() for _, m in rows),
            "mismatch/max": torch.stack([g["abs"].max() for g, _ in rows]).max(),
            "mismatch/k3/max": torch.stack([g["k3"].max() for g, _ in rows]).max()}


def probe_mismatch(engine, model: List, pg: ParallelGroups, prompt_ids: List[int], *,
                   max_tokens: int, temperature: float, cp_size: int, cp_rank: int,
                   device) -> float:
    """Max |engine - trainer| log-prob over one sampled response to ``prompt_ids`` (a fixed
    seed): the weight sync's check. ``-inf`` off the last pipeline stage."""
    [[sample]] = engine.generate([prompt_ids], n=1, max_tokens=max_tokens,
                                 temperature=temperature, seed=12345)
    batch = build_step_batch([group_sequences(prompt_ids, [sample])], [torch.zeros(1)], 1, pg,
                             cp_size=cp_size, cp_rank=cp_rank, packed=False, device=device)
    lp = forward_logprobs(model, batch.micro_batches, pg, temperature=temperature)
    if not lp:
        return float("-inf")
    mb = batch.micro_batches[0]
    return float(((lp[0] - mb.rollout_logprobs).abs() * mb.shard.mask).max())
