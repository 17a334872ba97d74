"""Megatron model path under TP / EP / PP / DP on CPU: gradients against a single-process run.

One spawn, three phases per layout:
1. every rank builds the world-1-shaped model (TP=PP=EP=1) from the same seed and computes the
   reference loss and gradients over the whole step in plain autograd; the weights are saved as a
   megatron-core distributed checkpoint;
2. the layout under test loads that checkpoint (Megatron reshards it), runs the step through
   ``train_forward_backward`` (Megatron's schedule, DDP, our loss adapter) on this rank's share of
   the micro-batches, then writes its gradients into the parameters and saves them the same way;
3. the world-1 layout loads those "gradient" checkpoints back (Megatron un-shards them) and each
   parameter is compared with the reference gradient.
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_rl.algo.advantages import compute_advantages
from megatron_rl.model.build import ModelOptions
from megatron_rl.parallel.config import Layout
from megatron_rl.model.hf_config import load_hf_config
from megatron_rl.model.tiny import tiny_hf_config
from megatron_rl.parallel.cp_layout import CPShard, shift_left
from megatron_rl.parallel.groups import ParallelGroups
from megatron_rl.parallel.loss import prepare_micro_batch, step_denominators
from megatron_rl.train.batches import build_micro_batch
from megatron_rl.train.megatron_loss import PolicyLoss, PolicyMicroBatch, _loss_func, train_forward_backward
from megatron_rl.runtime.model_setup import build_model, unwrap
from megatron_rl.runtime.parallel_init import destroy_megatron_parallel, init_megatron_parallel

S, NSEQ, PROMPT = 16, 8, 4
LOSSES = {
    "gspo": ("grpo", {}, {"eps_low": 0.02, "eps_high": 0.03}),
    "future_kl_grpo": ("future_kl_grpo", {"beta": 0.2},
                       {"ratio": "future", "weight": "ppo_clip",
                        "weight_params": {"eps_low": 0.05, "eps_high": 0.05}}),
}


RESPONSES = {
    "uneven": [12, 7, 9, 3, 12, 1, 5, 10],
    # sequences of 5-6 tokens: at CP 4 (chunks of 1 after padding to 8) CP ranks 0-2 hold no
    # response token in label coordinates, only rank 3 does
    "short": [1, 2, 1, 1, 2, 1, 1, 2],
}


def _sequences(vocab: int, seed: int = 0, responses: str = "uneven") -> Dict[str, torch.Tensor]:
    """NSEQ sequences of S tokens (2 groups of 4; responses of uneven length), label coordinates."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (NSEQ, S), generator=g)
    loss_mask = torch.zeros(NSEQ, S)
    for b, n in enumerate(RESPONSES[responses]):
        loss_mask[b, PROMPT:PROMPT + n] = 1
    mask = shift_left(loss_mask, 1)
    return dict(tokens=tokens, labels=shift_left(tokens, 1), mask=mask, loss_mask=loss_mask,
                old=-2.5 + 0.05 * torch.randn(NSEQ, S, generator=g),
                kl=0.1 * torch.rand(NSEQ, S, generator=g) * mask,
                rewards=torch.rand(NSEQ, generator=g), groups=torch.arange(NSEQ) // 4)


def _advantages(data, adv_name, adv_params):
    return compute_advantages(adv_name, rewards=data["rewards"], mask=data["mask"],
                              group_ids=data["groups"], kl=data["kl"], **adv_params)


def _built_micro_batches(data, adv, rows_list, groups: ParallelGroups, packed: bool,
                         align: bool = False, rollout: bool = False) -> List[PolicyMicroBatch]:
    """Through the production batch builder, each sequence cut to its real length and sharded
    over CP (``align``: group-aligned packed lengths, as the trainer packs for future-KL;
    ``rollout``: the engine's log-probs too, equal to ``data["old"]``)."""
    out = []
    for rows in rows_list:
        seqs = []
        for b in rows:
            n = int(data["loss_mask"][b].nonzero().max()) + 1
            seqs.append({"tokens": data["tokens"][b, :n], "loss_mask": data["loss_mask"][b, :n],
                         "old_logprobs": data["old"][b, :n], "advantages": adv[b, :n]})
            if rollout:
                seqs[-1]["rollout_logprobs"] = data["old"][b, :n]
        out.append(build_micro_batch(seqs, data["groups"][rows], packed=packed,
                                     cp_size=groups.cp_size, cp_rank=groups.cp_rank,
                                     cp_group=groups.cp, align_groups=align,
                                     tp_size=groups.tp_size))
    return out


def _micro_batches(data, adv, rows_list, cp_group) -> List[PolicyMicroBatch]:
    out = []
    for rows in rows_list:
        shard = CPShard.bshd(len(rows), S, 1, 0)
        smb = prepare_micro_batch(shard, data["mask"][rows], data["groups"][rows], cp_group)
        out.append(PolicyMicroBatch(
            tokens=data["tokens"][rows], position_ids=torch.arange(S).expand(len(rows), S),
            labels=data["labels"][rows], shard=smb, old_logprobs=data["old"][rows],
            advantages=adv[rows]))
    return out


def _partition(dp: int, n_mb: int) -> List[List[int]]:
    """Rows of every micro-batch of the step, over all DP ranks (rank ``r`` holds rows ``b % dp == r``)."""
    out = []
    for r in range(dp):
        mine = [b for b in range(NSEQ) if b % dp == r]
        out += [mine[i::n_mb] for i in range(n_mb)]
    return out


def _reference(hf, data, adv, loss_name, params, seed, partition, opt):
    """Plain autograd, one process's worth: every rank computes it identically (no groups).

    The policy loss (global denominators) is a plain sum over micro-batches, so one micro-batch
    of the whole step gives it. The MoE auxiliary losses are not: each is computed over its own
    micro-batch's tokens, and Megatron's contract averages them over the step's micro-batches
    (all DP ranks), so with aux losses on the reference runs the same partition, each
    micro-batch's aux gradient weighted ``1 / len(partition)``.
    """
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    init_megatron_parallel(Layout(), seed)
    [model], _ = build_model(hf, Layout(), opt, ddp=False)
    mbs = _micro_batches(data, adv, partition, None)
    num_tokens, num_seqs = step_denominators([m.shard for m in mbs], None)
    loss = PolicyLoss(loss_name, params, num_tokens, num_seqs)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1) / len(partition))
    total = 0.0
    for mb in mbs:
        value, _ = _loss_func(mb, loss, ParallelGroups(), 1.0, None,
                              model(input_ids=mb.tokens, position_ids=mb.position_ids,
                                    attention_mask=None))
        value.backward()
        total += float(value)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return model, total, grads


def _save(model, path):
    from megatron.core import dist_checkpointing

    from megatron_rl.model.cpu_patches import in_process_checkpoint_writes

    os.makedirs(path, exist_ok=True)
    with in_process_checkpoint_writes():
        dist_checkpointing.save(model.sharded_state_dict(), path)


def _load(model, path):
    from megatron.core import dist_checkpointing

    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path))


def _run_layout(hf, layout, n_mb, data, adv, loss_name, params, seed, weights, out_dir, batching,
                opt, extra):
    groups = init_megatron_parallel(layout, seed)
    [model], _ = build_model(hf, layout, opt)
    _load(unwrap(model), weights)
    dp, r = groups.dp_size, groups.dp_rank
    mine = [b for b in range(NSEQ) if b % dp == r]
    rows = [mine[i::n_mb] for i in range(n_mb)]
    if batching == "manual":
        mbs = _micro_batches(data, adv, rows, groups.cp)
    else:
        mbs = _built_micro_batches(data, adv, rows, groups, packed=batching.startswith("thd"),
                                   align=batching == "thd_aligned")
    num_tokens, num_seqs = step_denominators([m.shard for m in mbs], groups.dp_cp)
    with _mutation(extra.get("mutation"), groups):
        logged = train_forward_backward([model], mbs, PolicyLoss(loss_name, params, num_tokens,
                                                                 num_seqs), groups)
    held = sum(float(m.shard.mask.sum()) for m in mbs)
    return _finish_layout(model, groups, [float(x["loss"]) for x in logged], out_dir), held


def _finish_layout(model, groups: ParallelGroups, losses, out_dir):
    """This rank's share of the step loss (TP ranks hold the same partial loss: counted once, on
    the last pipeline stage), and its gradients saved as a checkpoint in place of the weights."""
    from megatron.core import parallel_state as ps

    loss = torch.zeros(1, dtype=torch.float64)
    if ps.is_pipeline_last_stage() and groups.tp_rank == 0:
        loss[0] = sum(losses)
    with torch.no_grad():
        for p in model.module.parameters():
            p.copy_(p.main_grad)
    _save(unwrap(model), out_dir)
    destroy_megatron_parallel()
    return loss


@contextlib.contextmanager
def _mutation(name, groups: ParallelGroups):
    """Break the loss-scaling contract on purpose (the test must then fail)."""
    if name is None:
        yield
        return
    from megatron_rl.train import megatron_loss as ML

    if name != "cp_factor_twice":
        raise KeyError(name)
    orig = ML.megatron_loss_scale
    ML.megatron_loss_scale = lambda n, dp: orig(n, dp) * groups.cp_size  # Megatron already has it
    try:
        yield
    finally:
        ML.megatron_loss_scale = orig


def _layout_dp(layout: Layout, world: int) -> int:
    return world // (layout.tp * layout.pp * layout.cp)


def model_equivalence(rank: int, world: int, tmp: str, cases, model: str = "qwen3_moe",
                      hf_overrides: Optional[dict] = None) -> dict:
    """``cases``: list of (name, layout kwargs, n_mb, loss name[, batching[, ModelOptions kwargs[,
    extra]]]); batching: manual | bshd | thd | thd_aligned (the last three through the batch
    builder); extra: ``responses`` (a ``RESPONSES`` key), ``mutation``."""
    hf = load_hf_config(tiny_hf_config(model, **(hf_overrides or {})))
    results, refs, seed = {}, {}, 1234
    weights = os.path.join(tmp, "weights")
    saved = False  # a collective save: every rank takes the same branch
    for name, kw, n_mb, loss_name, *rest in cases:
        batching = rest[0] if rest else "manual"
        opt = ModelOptions(**(rest[1] if len(rest) > 1 else {}))
        extra = rest[2] if len(rest) > 2 else {}
        data = _sequences(hf.vocab_size, responses=extra.get("responses", "uneven"))
        aux = bool(opt.router_aux_loss_coef or opt.router_z_loss_coef)
        layout = Layout(**kw)
        partition = _partition(_layout_dp(layout, world), n_mb) if aux else [list(range(NSEQ))]
        adv_name, adv_params, params = LOSSES[loss_name]
        key = (loss_name, str(partition), opt, extra.get("responses"))
        if key not in refs:
            adv = _advantages(data, adv_name, adv_params)
            ref_model, value, grads = _reference(hf, data, adv, loss_name, params, seed, partition, opt)
            if not saved:  # the same seed builds the same weights every time
                _save(ref_model, weights)
                saved = True
            refs[key] = (value, grads, adv)
            destroy_megatron_parallel()
        value, ref_grads, adv = refs[key]
        out = os.path.join(tmp, f"grads_{name}")
        loss, held = _run_layout(hf, layout, n_mb, data, adv, loss_name, params, seed, weights,
                                 out, batching, opt, extra)
        dist.all_reduce(loss)
        held_by_rank = [0.0] * world
        dist.all_gather_object(held_by_rank, held)
        init_megatron_parallel(Layout(), seed)
        [model], _ = build_model(hf, Layout(), opt, ddp=False)
        _load(model, out)
        errs = {n: float((p.detach() - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-30))
                for n, p in model.named_parameters()}
        worst_param = max(errs, key=errs.get)
        worst = max(float(ref_grads[n].abs().max()) for n in ref_grads)
        destroy_megatron_parallel()
        results[name] = {"grad": errs[worst_param], "worst_param": worst_param,
                         "bad": {k: v for k, v in errs.items() if v > 1e-4},
                         "loss": abs(float(loss[0]) - value) / abs(value), "scale": worst,
                         "response_tokens_by_rank": held_by_rank}
    return results


def logprob_passes(rank: int, world: int) -> dict:
    """Old/reference log-prob passes: the forward-only pass equals the training forward, and the
    host-memory reference weights reproduce the base model's log-probs after an update."""
    from megatron_rl.train.megatron_loss import forward_logprobs
    from megatron_rl.train.optimizer import OptimSettings, build_optimizer, nonfinite_flag, optimizer_step
    from megatron_rl.train.reference import HostWeights
    from megatron_rl.parallel.vocab_parallel import vocab_parallel_logprobs

    hf = load_hf_config(tiny_hf_config("qwen3_moe"))
    groups = init_megatron_parallel(Layout(), 7)
    model, _ = build_model(hf, Layout(), ModelOptions(), distributed_optimizer=True)
    opt, sched = build_optimizer(model, OptimSettings(lr=1e-2), torch.float32)
    data = _sequences(hf.vocab_size)
    adv = _advantages(data, "grpo", {})
    mbs = _micro_batches(data, adv, [[0, 1, 2, 3], [4, 5, 6, 7]], groups.cp)
    base = forward_logprobs(model, mbs, groups)
    with torch.no_grad():
        direct = [vocab_parallel_logprobs(unwrap(model[0])(input_ids=m.tokens, position_ids=m.position_ids,
                                                           attention_mask=None), m.labels)[0]
                  for m in mbs]
    ref = HostWeights(model)
    nt, ns = step_denominators([m.shard for m in mbs], groups.dp_cp)
    model[0].zero_grad_buffer()
    train_forward_backward(model, mbs, PolicyLoss("gspo", {"eps_low": 0.2, "eps_high": 0.2}, nt, ns),
                           groups)
    optimizer_step(opt, sched, nonfinite_flag(model, []), torch.distributed.group.WORLD)
    after = forward_logprobs(model, mbs, groups)
    with ref.swapped_in():
        ref_lp = forward_logprobs(model, mbs, groups)
    again = forward_logprobs(model, mbs, groups)
    destroy_megatron_parallel()
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    return {"pass_equals_direct": same(base, direct), "ref_equals_base": same(ref_lp, base),
            "restored": same(again, after), "update_changed": not same(after, base)}


def epoch_passes(rank: int, world: int) -> dict:
    """``run_updates`` with 2 epochs x 2 updates over 4 micro-batches against the same four
    updates made by hand in ``epoch_orders``' order, from the same initial weights (the
    advantages and old log-probs of the rollout, fixed), and against 1 epoch."""
    from megatron_rl.train.optimizer import OptimSettings, build_optimizer, nonfinite_flag, optimizer_step
    from megatron_rl.train.rl_batch import StepBatch, StepPlan, epoch_orders, run_updates, update_slices

    hf = load_hf_config(tiny_hf_config("qwen3_moe"))
    data = _sequences(hf.vocab_size)
    adv = _advantages(data, "grpo", {})
    rows = [[0, 1], [2, 3], [4, 5], [6, 7]]
    params = {"eps_low": 0.2, "eps_high": 0.2}
    step, seed = 3, 11

    def fresh():
        groups = init_megatron_parallel(Layout(), 7)
        model, _ = build_model(hf, Layout(), ModelOptions(), distributed_optimizer=True)
        opt, sched = build_optimizer(model, OptimSettings(lr=1e-2), torch.float32)
        mbs = _micro_batches(data, adv, rows, groups.cp)
        return groups, model, opt, sched, mbs

    def weights(model):
        out = {k: v.detach().clone() for k, v in unwrap(model[0]).state_dict().items()
               if torch.is_tensor(v)}
        destroy_megatron_parallel()
        return out

    results = {}
    for epochs in (2, 1):
        groups, model, opt, sched, mbs = fresh()
        plan = StepPlan("grpo", {}, "gspo", params, updates=2, epochs=epochs, seed=seed)
        sums = run_updates(model, opt, sched, StepBatch(mbs, [data["rewards"]] * 4, [None] * 4),
                           groups, plan, step)
        results[epochs] = (weights(model), sums)
    groups, model, opt, sched, mbs = fresh()
    orders = epoch_orders(4, 2, seed, step)
    for order in orders:
        for sl in update_slices(4, 2):
            chosen = [mbs[order[i]] for i in sl]
            nt, ns = step_denominators([m.shard for m in chosen], groups.dp_cp)
            model[0].zero_grad_buffer()
            logged = train_forward_backward(model, chosen, PolicyLoss("gspo", params, nt, ns), groups)
            optimizer_step(opt, sched, nonfinite_flag(model, [r["loss"] for r in logged]),
                           torch.distributed.group.WORLD)
    by_hand = weights(model)
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    sums = results[2][1]
    return {"equal_to_hand": same(results[2][0], by_hand),
            "differs_from_one_epoch": not same(results[2][0], results[1][0]),
            "shuffled": orders[1] != orders[0],
            "updates": float(sums["train/updates"]),
            "epoch_keys": sorted(k for k in sums if k.startswith("train/epoch")),
            "mean_is_mean_of_epochs": abs(float(sums["train/loss"]) - 0.5 * (
                float(sums["train/epoch1/loss"]) + float(sums["train/epoch2/loss"]))) < 1e-6}


def routing_replay(rank: int, world: int) -> dict:
    """Routes recorded in the old-policy pass are the ones the training forward uses after the
    weights moved; without replay some tokens would go elsewhere."""
    from megatron_rl.train.megatron_loss import forward_logprobs
    from megatron_rl.train.optimizer import OptimSettings, build_optimizer, nonfinite_flag, optimizer_step

    hf = load_hf_config(tiny_hf_config("qwen3_moe"))
    groups = init_megatron_parallel(Layout(), 11)
    model, _ = build_model(hf, Layout(), ModelOptions(), distributed_optimizer=True)
    opt, sched = build_optimizer(model, OptimSettings(lr=0.05), torch.float32)
    maps: List[torch.Tensor] = []
    for layer in unwrap(model[0]).decoder.layers:
        layer.mlp.router.register_forward_hook(lambda m, i, o: maps.append(o[1].detach().clone()))
    data = _sequences(hf.vocab_size)
    mbs = _micro_batches(data, _advantages(data, "grpo", {}), [list(range(NSEQ))], groups.cp)

    def routes_of(run):
        maps.clear()
        run()
        return [m.clone() for m in maps]

    old = routes_of(lambda: forward_logprobs(model, mbs, groups, record_routes=True))
    recorded = mbs[0].routes
    nt, ns = step_denominators([m.shard for m in mbs], groups.dp_cp)
    for _ in range(3):  # move the weights (each training forward replays the recorded routes)
        model[0].zero_grad_buffer()
        trained = routes_of(lambda: train_forward_backward(
            model, mbs, PolicyLoss("gspo", {"eps_low": 10.0, "eps_high": 10.0}, nt, ns), groups))
        optimizer_step(opt, sched, nonfinite_flag(model, []), torch.distributed.group.WORLD)
    replayed = routes_of(lambda: forward_logprobs(model, mbs, groups))
    mbs[0].routes = None
    free = routes_of(lambda: forward_logprobs(model, mbs, groups))
    destroy_megatron_parallel()
    eq = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    return {"layers": int(recorded.shape[1]), "train_used_recorded": eq(trained, old),
            "replay_used_recorded": eq(replayed, old), "free_routes_moved": not eq(free, old),
            "moved_tokens": int(sum((f != o).any(-1).sum() for f, o in zip(free, old)))}
