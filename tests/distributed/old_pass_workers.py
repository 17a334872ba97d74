"""Worker for test_old_from_update: one RL step through the trainer's functions
(``rl_batch.logprob_passes`` then ``rl_batch.run_updates``) twice from the same weights and batch:
with the separate old-policy pass, and with the old log-probs taken from the update's own forward
(``StepPlan.old_from_update``). Each rank compares what it holds; the worst difference over the
ranks comes back."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_rl.model.build import ModelOptions
from megatron_rl.model.hf_config import load_hf_config
from megatron_rl.model.tiny import tiny_hf_config
from megatron_rl.parallel.config import Layout
from megatron_rl.runtime.model_setup import build_model
from megatron_rl.train.moe_stats import RouterLoad
from megatron_rl.train.optimizer import OptimSettings, build_optimizer
from megatron_rl.runtime.parallel_init import destroy_megatron_parallel, init_megatron_parallel
from megatron_rl.train.rl_batch import StepBatch, StepPlan, logprob_passes, mismatch_sums, run_updates
from tests.distributed.model_workers import NSEQ, _built_micro_batches, _sequences

SEED = 31


def _step(hf, data, layout, n_mb, packed, separate):
    groups = init_megatron_parallel(layout, SEED)
    model, _ = build_model(hf, layout, ModelOptions(), distributed_optimizer=True)   # the trainer's
    opt, sched = build_optimizer(model, OptimSettings(lr=1e-2), torch.float32)
    # as the trainer deals them: whole groups to each DP rank, whole groups to each micro-batch
    mine = sorted({int(g) for g in data["groups"]})[groups.dp_rank::groups.dp_size]
    rows = [[b for b in range(NSEQ) if int(data["groups"][b]) in mine[i::n_mb]] for i in range(n_mb)]
    batch = StepBatch(_built_micro_batches(data, torch.zeros_like(data["mask"]), rows, groups,
                                           packed, rollout=True),
                      [data["rewards"][r] for r in rows], [None] * n_mb)
    plan = StepPlan("grpo", {}, "gspo", {"eps_low": 0.2, "eps_high": 0.2},
                    separate_old_pass=separate)
    assert plan.old_from_update is not separate
    router = RouterLoad(model)
    logprob_passes(model, batch, groups, plan, router_load=router)
    sums = run_updates(model, opt, sched, batch, groups, plan, router_load=router)
    sums.update(mismatch_sums(batch))
    out = {"params": [p.detach().clone() for p in model[0].module.parameters()],
           "sums": {k: torch.as_tensor(v).double() for k, v in sums.items()},
           "router": router.metrics(), "has_logprobs": batch.has_logprobs,
           "old": [mb.old_logprobs for mb in batch.micro_batches] if batch.has_logprobs else []}
    destroy_megatron_parallel()
    return out


def old_from_update_equivalence(rank: int, world: int, cases) -> dict:
    """``cases``: (name, layout kwargs, micro-batches per rank, THD packing)."""
    hf = load_hf_config(tiny_hf_config("qwen3_moe"))
    data = _sequences(hf.vocab_size)
    results = {}
    for name, kw, n_mb, packed in cases:
        a = _step(hf, data, Layout(**kw), n_mb, packed, separate=True)
        b = _step(hf, data, Layout(**kw), n_mb, packed, separate=False)
        assert a["sums"].keys() == b["sums"].keys(), (a["sums"].keys(), b["sums"].keys())
        worst = torch.tensor([
            max(float((x - y).abs().max()) for x, y in zip(a["params"], b["params"])),
            max([float((a["sums"][k] - b["sums"][k]).abs().max()) for k in a["sums"]]),
            max([float((x - y).abs().max()) for x, y in zip(a["old"], b["old"])] or [0.0]),
            float(a["router"] != b["router"] or a["has_logprobs"] != b["has_logprobs"]),
            float(a["has_logprobs"] and bool(a["router"])),   # a rank checked both
        ], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        moved = max(float((p - q).abs().max()) for p, q in zip(a["params"], _initial(hf, kw)))
        results[name] = {"params": float(worst[0]), "metrics": float(worst[1]),
                         "old_logprobs": float(worst[2]), "router_or_stage_differs": bool(worst[3]),
                         "checked": bool(worst[4]), "update_moved_weights": moved,
                         "metric_keys": sorted(a["sums"])}
    return results


def _initial(hf, kw):
    init_megatron_parallel(Layout(**kw), SEED)
    model, _ = build_model(hf, Layout(**kw), ModelOptions(), distributed_optimizer=True)
    params = [p.detach().clone() for p in model[0].module.parameters()]
    destroy_megatron_parallel()
    return params
