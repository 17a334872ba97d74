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
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from megatron_rl.algo.advantages import PER_POSITION_ESTIMATORS, step_whitening
from megatron_rl.algo.kl import kl_estimate
from megatron_rl.parallel.groups import ParallelGroups
from megatron_rl.parallel.loss import sharded_advantages, step_denominators, step_whiten
from megatron_rl.train.crash_points import reached
from megatron_rl.train.batches import build_micro_batch
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
    record_routes: bool = False
    packed: bool = False
    separate_old_pass: bool = False         # run the old-policy pass even where not needed

    @property
    def old_from_update(self) -> bool:
        """One update over the whole batch, and no reference, critic (``gae``) or routing replay
        reading the old log-probs before it: the update's own forward runs the rollout's policy,
        so its log-probs, detached, are the old ones (exactly) and a separate pass is not run."""
        return not (self.separate_old_pass or self.updates != 1 or self.epochs != 1
                    or self.needs_reference or self.record_routes or self.advantage == "gae")


@dataclass
class StepBatch:
    micro_batches: List[PolicyMicroBatch]
    rewards: List[Tensor]                   # [B] per micro-batch, shaped
    ref: List[Optional[Tensor]]             # [B, 2C] reference log-probs per micro-batch
    has_logprobs: bool = False              # this rank computed the old log-probs (last PP stage)
    values: Optional[List[Tensor]] = None   # [B, 2C] the rollout-time critic's values (gae)
    returns: Optional[List[Tensor]] = None  # [B, 2C] the critic's targets: advantage + value


def group_sequences(prompt_ids: List[int], samples: Sequence) -> List[Dict[str, Tensor]]:
    """One group's sequences: prompt + response tokens exactly as the engine saw them, the loss
    mask over the response's action tokens (multi-turn: the sample's ``action_mask``, 0 on
    observation tokens), and the engine's log-probs in label coordinates (row ``p`` is about
    token ``p + 1``)."""
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
    return out


def build_step_batch(groups: List[List[Dict[str, Tensor]]], rewards: List[Tensor],
                     groups_per_micro_batch: int, pg: ParallelGroups, *, cp_size: int, cp_rank: int,
                     packed: bool, device, advantage: str = "") -> StepBatch:
    """``groups[P][G]`` sequences and their ``rewards[P]`` ``[G]`` -> micro-batches of whole groups.
    An ``advantage`` with per-position group statistics gets group-aligned packed lengths
    (``batches.packed_lengths``): under CP its statistics then need no communication."""
    align = advantage in PER_POSITION_ESTIMATORS
    mbs, rs = [], []
    for start in range(0, len(groups), groups_per_micro_batch):
        chunk = range(start, min(start + groups_per_micro_batch, len(groups)))
        seqs = [s for g in chunk for s in groups[g]]
        gid = torch.tensor([i for i, g in enumerate(chunk) for _ in groups[g]])
        mbs.append(build_micro_batch(seqs, gid, packed=packed, cp_size=cp_size, cp_rank=cp_rank,
                                     cp_group=pg.cp, num_groups=len(chunk), align_groups=align,
                                     tp_size=pg.tp_size, device=device))
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
    """Old-policy log-probs (recording expert routes for replay when asked), the reference
    log-probs when the algorithm uses a KL, the critic's values (PPO), then the advantages. Last
    pipeline stage only; the other stages keep placeholders (they never compute a loss)."""
    if plan.old_from_update:
        _old_from_update(batch, plan, pg, critic)
        return
    with router_load.counting() if router_load is not None else contextlib.nullcontext():
        old = forward_logprobs(model, batch.micro_batches, pg, record_routes=plan.record_routes,
                               temperature=plan.temperature)
    for mb, lp in zip(batch.micro_batches, old):
        mb.old_logprobs = lp
    batch.has_logprobs = bool(old)
    # every pipeline stage runs each pass (the schedule is collective); the last keeps the results
    if plan.needs_reference:
        with reference.swapped_in():
            # the reference routes its own tokens: the recorded routes are the current policy's
            ref = forward_logprobs(model, batch.micro_batches, pg, replay_routes=False,
                                   temperature=plan.temperature)
        if old:
            batch.ref = ref
            for mb, r in zip(batch.micro_batches, ref):
                mb.ref_logprobs = r
    if critic is not None:
        values = critic.values(batch.micro_batches)
        if old:
            batch.values, batch.returns = values, [torch.zeros_like(v) for v in values]
    if old:
        set_advantages(batch, range(len(batch.micro_batches)), plan, pg)


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


def update_slices(n_micro_batches: int, updates: int) -> List[range]:
    """``updates`` contiguous runs of micro-batches, sizes differing by at most one."""
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
    mean as ``train/epoch<k>/...``. ``router_load`` counts expert loads in the update's forward
    when it is the step's only one (``plan.old_from_update``)."""
    count = router_load is not None and plan.old_from_update
    sums: Dict[str, Tensor] = {}
    n_updates, skipped = 0, 0.0
    orders = epoch_orders(len(batch.micro_batches), plan.epochs, plan.seed, step)
    slices = update_slices(len(batch.micro_batches), plan.updates)
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
                with router_load.counting() if count else contextlib.nullcontext():
                    row = _one_update(model, optimizer, scheduler, batch, idx, pg, plan)
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
                pg: ParallelGroups, plan: StepPlan) -> Dict[str, Tensor]:
    """One optimizer update over micro-batches ``idx``: this rank's partial loss metrics (summed
    over them), the gradient norm and whether the update was skipped."""
    mbs = [batch.micro_batches[i] for i in idx]
    num_tokens, num_seqs = step_denominators([m.shard for m in mbs], pg.dp_cp)
    for chunk in model:
        chunk.zero_grad_buffer()
    loss = PolicyLoss(plan.loss, plan.loss_params, num_tokens, num_seqs, plan.temperature)
    logged = train_forward_backward(model, mbs, loss, pg)
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
    """Train/inference mismatch on this step's tokens: |trainer old log-prob - engine log-prob|
    summed over action tokens (partial sums, on the device; divide by the token count after the
    reduce). Only the last pipeline stage has the trainer's log-probs: the others add nothing."""
    if not batch.has_logprobs:
        return {}
    diffs = [((mb.old_logprobs.double() - mb.rollout_logprobs.double()).abs() * mb.shard.mask.double(),
              mb.shard.mask.double()) for mb in batch.micro_batches]
    return {"mismatch/abs_sum": sum(d.sum() for d, _ in diffs),
            "mismatch/tokens": sum(m.sum() for _, m in diffs),
            "mismatch/max": torch.stack([d.max() for d, _ in diffs]).max()}


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
