"""Worker functions run by ``harness.spawn``: each rank computes its share and the figures that
rank 0 reports (relative errors against the single-process reference of ``batches``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron_rl.parallel import seq_ops
from megatron_rl.parallel.collectives import all_reduce_nograd, all_reduce_partial, all_reduce_replicated
from megatron_rl.parallel.cp_layout import CPShard, bshd_shard, padded_length
from megatron_rl.parallel.groups import build_groups
from megatron_rl.train.batches import actions_share_columns
from megatron_rl.algo.advantages import step_whitening
from megatron_rl.parallel.loss import (
    logprobs_entropy, prepare_micro_batch, sharded_advantages, sharded_policy_loss, step_denominators,
    step_whiten,
)
from megatron_rl.algo.masked import SeqOps
from megatron_rl.algo.ratios import log_ratio
from tests.distributed import batches
from tests.distributed.batches import V, layout_tensors, make_micro_batches, reference_step


@dataclass(frozen=True)
class Case:
    name: str
    adv: str
    loss: str
    adv_params: Dict = field(default_factory=dict)
    loss_params: Dict = field(default_factory=dict)
    use_ref: bool = False
    use_rollout: bool = False
    step_whiten: bool = False      # the estimator's whitening over the whole step (the trainer's)


CASES = [
    Case("future_kl_token", "future_kl_grpo", "future_kl_grpo", {"beta": 0.2},
         {"ratio": "token", "weight": "ppo_clip", "weight_params": {"eps_low": 0.04, "eps_high": 0.05}}),
    Case("future_kl_sequence", "future_kl_grpo", "future_kl_grpo", {"beta": 0.2, "unbiased_std": False},
         {"ratio": "sequence", "weight": "ppo_clip", "weight_params": {"eps_low": 0.01, "eps_high": 0.02},
          "agg": "seq-mean-token-mean"}),
    Case("future_kl_future", "future_kl_grpo", "future_kl_grpo",
         {"beta": 0.5, "std_min": 0.2, "std_max": 3.0},
         {"ratio": "future", "weight": "power", "weight_params": {"q": 0.5},
          "agg": "seq-mean-token-sum", "norm_constant": 8.0}),
    Case("gspo", "grpo", "gspo", {}, {"eps_low": 0.01, "eps_high": 0.015}),
    Case("dr_gspo_tis_seq", "dr_grpo", "gspo", {},
         {"eps_low": 0.01, "eps_high": 0.015, "agg": "seq-mean-token-sum", "norm_constant": 6.0,
          "tis_cap": 1.01, "tis_level": "sequence", "tis_mode": "mask"}, use_rollout=True),
    Case("grpo_kl_in_loss", "grpo", "grpo", {"std_min": 0.1},
         {"eps_low": 0.03, "eps_high": 0.05, "kl_coef": 0.1, "kl_kind": "k3", "entropy_coef": 0.01,
          "tis_cap": 1.02}, use_ref=True, use_rollout=True),
    # the train/inference corrections: a token mask, a sequence mask on the geometric mean (a sum
    # over CP ranks) and one on the largest per-token KL (a MAX over CP ranks)
    Case("gspo_icepop_mis_tr", "grpo", "gspo", {},
         {"eps_low": 0.01, "eps_high": 0.015, "tis_cap": 1.03, "icepop": (0.97, 1.03),
          "mis": (0.995, 1.005), "tr_max_kl": 5e-4}, use_rollout=True),
    Case("reinforce_upper_clip", "rloo", "reinforce", {},
         {"ratio": "sequence", "weight": "upper_clip", "weight_params": {"eps": 0.01},
          "agg": "seq-mean-token-mean", "kl_coef": 0.05, "kl_kind": "k2"}, use_ref=True),
    Case("reinforce_pp", "reinforce_pp", "reinforce", {"kl_coef": 0.05, "baseline": "group"},
         {"ratio": "token", "weight": "full", "agg": "token-mean"}, step_whiten=True),
    Case("grpo_kl_surrogate_k1", "grpo", "grpo", {"whiten": True},
         {"eps_low": 0.03, "eps_high": 0.05, "kl_coef": 0.1, "kl_kind": "k1",
          "kl_placement": "surrogate"}, use_ref=True, step_whiten=True),
    Case("gspo_kl_surrogate_k3", "grpo", "gspo", {},
         {"eps_low": 0.01, "eps_high": 0.015, "kl_coef": 0.2, "kl_kind": "k3",
          "kl_placement": "surrogate", "kl_clamp_log_ratio": 0.5}, use_ref=True),
]

# (cp, tp, dp): each dimension alone, and combinations; world 8 holds the largest
PARALLEL = [(1, 1, 1), (2, 1, 1), (4, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 2, 2), (4, 2, 1)]
LAYOUTS = ["bshd", "thd", "thd_aligned"]
FP32_PARALLEL = [(2, 2, 1), (4, 1, 2)]
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def key(case: str, layout: str, par, dtype: str) -> str:
    cp, tp, dp = par
    return f"{case}|{layout}|cp{cp}-tp{tp}-dp{dp}|{dtype}"


def _sharded_step(mbs, case: Case, layout: str, par, groups, dtype, ref_grads):
    """This rank's partial loss and metrics for the step, and its max gradient error."""
    cp, tp, dp = par
    cp_rank, tp_rank, dp_rank = groups.cp_rank, groups.tp_rank, groups.dp_rank
    Vs = V // tp
    v0 = tp_rank * Vs
    mine = [i for i in range(len(mbs)) if i % dp == dp_rank]
    prepared = []
    for i in mine:
        mb = mbs[i]
        cu, S, local = layout_tensors(mb, layout, cp, cp_rank)
        aligned = actions_share_columns([mb.loss_mask_tokens(b) for b in range(len(mb.seqs))],
                                        mb.group_of_seq)
        if layout == "bshd":
            shard = CPShard.bshd(len(mb.seqs), S, cp, cp_rank, actions_aligned=aligned)
        else:
            shard = CPShard.thd(cu, cp, cp_rank, group_of_seq=mb.group_of_seq,
                                actions_aligned=aligned)
        smb = prepare_micro_batch(shard, local["mask"], torch.tensor(mb.group_of_seq), groups.cp,
                                  num_groups=max(mb.group_of_seq) + 1, dtype=dtype)
        prepared.append((i, local, smb))
    num_tokens, num_seqs = step_denominators([p[2] for p in prepared], groups.dp_cp)
    advs = _advantages(mbs, case, prepared, groups, dtype)
    loss_sum, metrics, err = 0.0, {}, 0.0
    empty = sum(1 for _, _, smb in prepared if not bool(smb.mask.any()))
    for (i, local, smb), adv in zip(prepared, advs):
        mb = mbs[i]
        logits = local["logits"][..., v0:v0 + Vs].to(dtype).clone().requires_grad_()
        lp, ent = logprobs_entropy(smb, logits, local["labels"], tp_group=groups.tp, vocab_start=v0)
        old, ref, rollout = (smb.view(local[k].to(dtype)) for k in ("old", "ref", "rollout"))
        loss, m = sharded_policy_loss(
            case.loss, smb, logprobs=lp, old_logprobs=old, advantages=adv, num_tokens=num_tokens,
            num_seqs=num_seqs, ref_logprobs=ref if case.use_ref else None,
            rollout_logprobs=rollout if case.use_rollout else None, entropy=ent, **case.loss_params)
        loss.backward()
        _, _, ref_local = layout_tensors(mb, layout, cp, cp_rank, per_seq_logits=ref_grads[i])
        want = ref_local["logits"][..., v0:v0 + Vs]
        err = max(err, float((logits.grad.double() - want).abs().max()))
        loss_sum = loss_sum + loss.detach().double()
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v.detach().double()
    return loss_sum, metrics, err, empty


def _advantages(mbs, case: Case, prepared, groups, dtype):
    """Each micro-batch's advantages on this rank's view; with ``step_whiten`` the estimator's
    batch-wide whitening is done over every micro-batch of every DP x CP rank, as the trainer
    does (``rl_batch.set_advantages``)."""
    params, whiten = step_whitening(case.adv, case.adv_params) if case.step_whiten \
        else (case.adv_params, False)
    advs = []
    for i, local, smb in prepared:
        old, ref = (smb.view(local[k].to(dtype)) for k in ("old", "ref"))
        advs.append(sharded_advantages(case.adv, smb, rewards=mbs[i].rewards.to(dtype),
                                       kl=(old - ref) * smb.mask, **params))
    if whiten:
        advs = step_whiten(advs, [p[2] for p in prepared], groups.dp_cp)
    return advs


def loss_equivalence(rank: int, world: int, parallel=tuple(PARALLEL),
                     fp32_parallel=tuple(FP32_PARALLEL)) -> dict:
    """Every case x layout x parallel layout (x dtype): relative errors of the step loss, its
    metrics and the logits gradients against the single-process float64 reference."""
    mbs = make_micro_batches(seed=7)
    refs = {c.name: reference_step(mbs, c) for c in CASES}
    runs = [(p, "float64") for p in parallel] + [(p, "float32") for p in fp32_parallel]
    results = {}
    for par, dtype_name in runs:
        groups = build_groups(par[1], par[0], par[2])   # every rank creates every group
        for layout in LAYOUTS:
            for case in CASES:
                ref_loss, ref_metrics, ref_grads = refs[case.name]
                names = sorted(ref_metrics)
                sums = torch.zeros(1 + len(names), dtype=torch.float64)
                err = torch.zeros(1, dtype=torch.float64)
                empty = torch.zeros(1, dtype=torch.float64)
                if groups is not None:
                    loss, metrics, e, empty[0] = _sharded_step(mbs, case, layout, par, groups,
                                                               DTYPES[dtype_name], ref_grads)
                    if groups.tp_rank == 0:  # TP ranks hold the same partial loss: count it once
                        sums[0] = loss
                        sums[1:] = torch.stack([torch.as_tensor(metrics[n]) for n in names])
                    err[0] = e
                dist.all_reduce(sums)
                dist.all_reduce(err, op=dist.ReduceOp.MAX)
                dist.all_reduce(empty)
                scale = max(float(g.abs().max()) for gs in ref_grads for g in gs)
                want = torch.stack([ref_loss] + [torch.as_tensor(ref_metrics[n]) for n in names])
                # fp64: relative; fp32: relative to max(|value|, 1) -- the losses are means of
                # O(1) terms that can cancel to near zero, where fp32 has only absolute accuracy
                floor = 1e-300 if dtype_name == "float64" else 1.0
                rel = ((sums - want).abs() / want.abs().clamp_min(floor)).tolist()
                results[key(case.name, layout, par, dtype_name)] = {
                    "loss": rel[0], "grad": float(err[0]) / scale,
                    "metrics": dict(zip(names, rel[1:])),
                    "ranks_without_action_tokens": int(empty[0]),  # (rank, micro-batch) pairs
                }
    return results


# ---------------------------------------------------------------- backward conventions

def _tp_logprob_grad(z_local, targets, v0, reduce_fn, tp_group):
    """Log-prob composed from autograd collectives (what the fused kernel replaces)."""
    m = all_reduce_nograd(z_local.detach().amax(-1), tp_group, dist.ReduceOp.MAX)
    s = reduce_fn((z_local - m[:, None]).exp().sum(-1), tp_group)
    t = targets - v0
    here = (t >= 0) & (t < z_local.shape[1])
    zt = torch.where(here, z_local.gather(1, t.clamp(0, z_local.shape[1] - 1)[:, None]).squeeze(1),
                     torch.zeros_like(m))
    lp = reduce_fn(zt, tp_group) - m - s.log()
    return lp


def conventions(rank: int, world: int) -> dict:
    """The two classic bugs, made on purpose next to the right conventions (CP=2 x TP=2)."""
    groups = build_groups(2, 2, 1)
    g = torch.Generator().manual_seed(3)
    out = {}
    # TP-replicated loss: sum of log-probs, identical on both TP ranks
    z = torch.randn(10, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (10,), generator=g)
    w = torch.randn(10, generator=g, dtype=torch.float64)
    full = z.clone().requires_grad_()
    ref = torch.autograd.grad((torch.log_softmax(full, -1).gather(1, targets[:, None]).squeeze(1)
                               * w).sum(), full)[0]
    Vs, v0 = V // 2, groups.tp_rank * (V // 2)
    for name, fn in (("tp_replicated", all_reduce_replicated), ("tp_partial", all_reduce_partial)):
        zl = z[:, v0:v0 + Vs].clone().requires_grad_()
        (_tp_logprob_grad(zl, targets, v0, fn, groups.tp) * w).sum().backward()
        out[name] = _max_ratio_and_err(zl.grad, ref[:, v0:v0 + Vs])
    # CP-partial loss with gradients through the sequence and future-only log-ratios
    mb = make_micro_batches(seed=11)[0]
    for name, fn in (("cp_partial", all_reduce_partial), ("cp_replicated", all_reduce_replicated)):
        seq_ops.all_reduce_partial = fn
        try:
            out[name] = _cp_ratio_grad_error(mb, groups)
        finally:
            seq_ops.all_reduce_partial = all_reduce_partial
    return _gather_max(out)


def _max_ratio_and_err(got, want):
    err = float((got - want).abs().max() / want.abs().max())
    ratio = float((got.abs().sum() / want.abs().sum()))
    return [err, ratio]


def _ratio_objective(lp, old, adv, mask, ops):
    """A CP-partial loss with gradients through the sequence and future-only log-ratios."""
    seq = log_ratio("sequence", lp, old, mask, ops=ops)
    fut = log_ratio("future", lp, old, mask, ops=ops)
    return ((seq + fut * fut) * adv * mask).sum()


def _cp_ratio_grad_error(mb, groups):
    """Treat the response-aligned ``[B, T]`` tensors as sequences, shard them over CP (BSHD) and
    compare the gradient of the per-rank partial objectives with the whole-sequence gradient."""
    mask = batches.response_mask(mb)
    old = batches.response_aligned(mb, mb.old)
    adv = torch.linspace(-1, 1, mask.numel(), dtype=torch.float64).view_as(mask)
    lp = batches.response_aligned(mb, mb.ref).clone().requires_grad_()
    want = torch.autograd.grad(_ratio_objective(lp, old, adv, mask, SeqOps()), lp)[0]
    cp, r = groups.cp_size, groups.cp_rank
    B, T = mask.shape
    S = padded_length(T, cp)
    shard = CPShard.bshd(B, S, cp, r)

    def view(x):
        return shard.to_view(bshd_shard(torch.cat([x, x.new_zeros(B, S - T)], 1), cp, r))

    lp_local = view(lp.detach()).clone().requires_grad_()
    ops = seq_ops.CPSeqOps(shard, groups.cp)
    _ratio_objective(lp_local, view(old), view(adv), view(mask), ops).backward()
    return [float((lp_local.grad - view(want)).abs().max() / want.abs().max()), 0.0]


def _gather_max(out: Dict[str, List[float]]) -> dict:
    names = sorted(out)
    t = torch.tensor([out[n][0] for n in names], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    ratios = torch.tensor([out[n][1] for n in names], dtype=torch.float64)
    return {n: {"err": float(e), "ratio": float(q)} for n, e, q in zip(names, t, ratios)}
