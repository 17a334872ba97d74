"""Worker for test_token_budget: one RL step's gradient through the trainer's own path
(``rollout_batch.step_batch`` -> ``rl_batch.logprob_passes`` -> ``rl_batch.run_updates``) with
fixed-count micro-batches and with token-budget micro-batches (groups balanced over DP by tokens,
packed under the budget), on the same model and rollouts. The optimizer step is replaced by a
capture of the DP-reduced gradient (weights never move, so both paths see the same weights)."""

from __future__ import annotations

import torch

import megatron_rl.train.rl_batch as rl_batch
from megatron_rl.data.prompts import PromptRow
from megatron_rl.model.build import ModelOptions
from megatron_rl.model.hf_config import load_hf_config
from megatron_rl.model.tiny import tiny_hf_config
from megatron_rl.parallel.config import Layout
from megatron_rl.rollout.collect import Rollouts
from megatron_rl.rollout.engine import Sample
from megatron_rl.runtime.model_setup import build_model
from megatron_rl.runtime.parallel_init import destroy_megatron_parallel, init_megatron_parallel
from megatron_rl.train.rl_batch import StepPlan, logprob_passes, run_updates
from megatron_rl.train.rollout_batch import BatchShape, step_batch

SEED, GROUPS, G = 5, 8, 2


def ragged_rollouts(vocab: int, seed: int = 0) -> Rollouts:
    """``GROUPS`` groups of ``G`` responses, prompts of 4-9 tokens, responses of 2-40 (ragged)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    out = Rollouts()
    for p in range(GROUPS):
        prompt = torch.randint(0, vocab, (rnd(4, 9),), generator=g).tolist()
        group = []
        for _ in range(G):
            n = rnd(2, 40)
            group.append(Sample(p, prompt, torch.randint(0, vocab, (n,), generator=g).tolist(),
                                (-2.5 + 0.1 * torch.randn(n, generator=g)).tolist(), "stop"))
        out.rows.append(PromptRow(p, f"p{p}"))
        out.samples.append(group)
        out.rewards.append(torch.rand(G, generator=g))
    return out


def _gradient(model, rollouts, shape, groups, plan):
    """The step's DP-reduced gradients (one list per update) and its loss metrics."""
    grads = []

    def capture(optimizer, scheduler, bad, group):
        grads.append(torch.cat([p.main_grad.reshape(-1).clone() for p in model[0].parameters()]))
        return False, 0.0, None

    real = rl_batch.optimizer_step
    rl_batch.optimizer_step = capture
    try:
        batch = step_batch(rollouts, shape, groups, torch.device("cpu"))
        logprob_passes(model, batch, groups, plan)
        sums = run_updates(model, None, None, batch, groups, plan)
    finally:
        rl_batch.optimizer_step = real
    loss = torch.as_tensor(sums["train/loss"]).double().reshape(1)
    torch.distributed.all_reduce(loss)
    return grads, float(loss), dict(batch.plan_metrics), len(batch.micro_batches)


def budget_equivalence(rank: int, world: int, cases) -> dict:
    """``cases``: (name, loss, loss params, packed, updates, budget, groups per fixed micro-batch).
    Returns each case's worst gradient difference, losses and the budget plan's metrics."""
    hf = load_hf_config(tiny_hf_config("qwen3_moe"))
    rollouts = ragged_rollouts(hf.vocab_size)
    layout = Layout()
    groups = init_megatron_parallel(layout, SEED)
    model, _ = build_model(hf, layout, ModelOptions(), distributed_optimizer=False)
    out = {}
    for name, loss, params, packed, updates, budget, per_mb in cases:
        real_denominators = rl_batch.step_denominators
        if name.startswith("mutant_local_denominators"):
            # each rank normalises by its own tokens: the gradient then depends on the split
            rl_batch.step_denominators = lambda mbs, group: real_denominators(mbs, None)
        plan = StepPlan("grpo", {}, loss, params, updates=updates, separate_old_pass=True)
        common = dict(dp=groups.dp_size, dp_rank=groups.dp_rank, cp_size=1, cp_rank=0,
                      packed=packed, advantage="grpo", updates=updates)
        fixed = _gradient(model, rollouts, BatchShape(groups_per_micro_batch=per_mb, **common),
                          groups, plan)
        budgeted = _gradient(model, rollouts, BatchShape(groups_per_micro_batch=per_mb,
                                                         max_tokens=budget, **common), groups, plan)
        assert len(fixed[0]) == len(budgeted[0]) == updates, (len(fixed[0]), len(budgeted[0]))
        scale = max(float(g.abs().max()) for g in fixed[0])
        diff = max(float((a - b).abs().max()) for a, b in zip(fixed[0], budgeted[0]))
        out[name] = {"grad_diff": diff, "grad_scale": scale, "loss": (fixed[1], budgeted[1]),
                     "metrics": budgeted[2], "fixed_metrics": fixed[2],
                     "micro_batches": (fixed[3], budgeted[3])}
        rl_batch.step_denominators = real_denominators
    destroy_megatron_parallel()
    return out
