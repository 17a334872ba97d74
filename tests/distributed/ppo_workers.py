"""One PPO step (policy + critic) through the trainer's own functions under TP / PP / EP / CP / DP,
against one process's plain autograd.

The trainer's path: ``rl_batch.logprob_passes`` (old log-probs, reference log-probs, the critic's
values, GAE with a KL reward, returns before the step-wide whitening) and ``rl_batch.run_updates``
(one policy update, then one critic update on the same micro-batches). The reference computes
the same step by hand on the whole batch in one process: log-probs and values by plain forwards,
``compute_advantages("gae")``, the whitening over all action tokens, the policy loss and the
clipped value loss, and their gradients by autograd. Weights and gradients travel as
distributed checkpoints, as in ``model_workers``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_rl.algo.advantages import compute_advantages
from megatron_rl.algo.masked import masked_whiten
from megatron_rl.model.build import ModelOptions
from megatron_rl.model.hf_config import load_hf_config
from megatron_rl.model.tiny import tiny_hf_config
from megatron_rl.parallel.config import Layout
from megatron_rl.parallel.groups import ParallelGroups
from megatron_rl.parallel.loss import step_denominators
from megatron_rl.parallel.vocab_parallel import vocab_parallel_logprobs
from megatron_rl.train.critic import Critic
from megatron_rl.train.megatron_loss import PolicyLoss, _loss_func
from megatron_rl.runtime.model_setup import build_model, unwrap
from megatron_rl.train.optimizer import OptimSettings, build_optimizer
from megatron_rl.runtime.parallel_init import destroy_megatron_parallel, init_megatron_parallel
from megatron_rl.train.rl_batch import StepBatch, StepPlan, logprob_passes, run_updates
from megatron_rl.train.value_train import ValueLossSpec, _value_loss_func
from tests.distributed.model_workers import (NSEQ, _built_micro_batches, _load, _micro_batches,
                                             _save, _sequences)

GAE = {"gamma": 0.97, "lam": 0.9, "kl_coef": 0.3}
PPO = {"eps_low": 0.2, "eps_high": 0.2}
CLIP = 0.2
INIT_STD = 0.05


def _models(hf, layout, ddp: bool):
    opt = ModelOptions()
    policy, _ = build_model(hf, layout, opt, ddp=ddp)
    ref, _ = build_model(hf, layout, opt, ddp=ddp)       # other random weights: a nonzero KL
    critic, _ = build_model(hf, layout, opt, ddp=ddp, value_head=True, value_head_init_std=INIT_STD)
    return policy, ref, critic


def _reference(hf, data, seed, tmp):
    """The step by hand, one process; saves the three models' weights for the layouts."""
    init_megatron_parallel(Layout(), seed)
    [policy], [ref], [critic] = _models(hf, Layout(), ddp=False)
    for name, m in (("policy", policy), ("ref", ref), ("critic", critic)):
        _save(m, os.path.join(tmp, name))
    [mb] = _micro_batches(data, torch.zeros_like(data["mask"]), [list(range(NSEQ))], None)
    run = lambda m: m(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=None)  # noqa: E731
    with torch.no_grad():
        lp = vocab_parallel_logprobs(run(policy), mb.labels)[0]
        lp_ref = vocab_parallel_logprobs(run(ref), mb.labels)[0]
        v_old = run(critic).squeeze(-1)
    mask = data["mask"]
    raw = compute_advantages("gae", rewards=data["rewards"], mask=mask, group_ids=data["groups"],
                             kl=(lp - lp_ref) * mask, values=v_old, **GAE, whiten=False)
    returns = (raw + v_old) * mask
    mb.old_logprobs, mb.advantages = lp, masked_whiten(raw, mask)
    nt, ns = step_denominators([mb.shard], None)
    loss, _ = _loss_func(mb, PolicyLoss("grpo", PPO, nt, ns), ParallelGroups(), 1.0, None, run(policy))
    loss.backward()
    vloss, _ = _value_loss_func(mb, (v_old, returns), ValueLossSpec(nt, ns, clip=CLIP), 1.0,
                                run(critic))
    vloss.backward()
    grads = {"policy": {n: p.grad.detach().clone() for n, p in policy.named_parameters()},
             "critic": {n: p.grad.detach().clone() for n, p in critic.named_parameters()}}
    destroy_megatron_parallel()
    return grads, float(returns.abs().max())


def _optimizer(model):
    # no clipping: the gradients are compared after the update, and clipping scales them in place
    return build_optimizer(model, OptimSettings(lr=1e-3, max_grad_norm=1e9, distributed=False),
                           torch.float32)


def _run_layout(hf, layout, n_mb, data, seed, tmp, packed, out, replay):
    from megatron_rl.train.reference import HostWeights

    groups = init_megatron_parallel(layout, seed)
    opt = ModelOptions()                          # built in the trainer's order: policy, critic
    policy, _ = build_model(hf, layout, opt)
    critic, _ = build_model(hf, layout, opt, value_head=True)
    _load(unwrap(critic[0]), os.path.join(tmp, "critic"))
    _load(unwrap(policy[0]), os.path.join(tmp, "ref"))
    reference = HostWeights(policy)                      # as the trainer keeps its reference
    _load(unwrap(policy[0]), os.path.join(tmp, "policy"))
    mine = [b for b in range(NSEQ) if b % groups.dp_size == groups.dp_rank]
    rows = [mine[i::n_mb] for i in range(n_mb)]
    mbs = _built_micro_batches(data, torch.zeros_like(data["mask"]), rows, groups, packed=packed)
    batch = StepBatch(mbs, [data["rewards"][r] for r in rows], [None] * len(mbs))
    plan = StepPlan("gae", dict(GAE), "grpo", dict(PPO), needs_reference=True,
                    routing_replay="old" if replay else "off")
    c_opt, c_sched = _optimizer(critic)
    c = Critic(critic, c_opt, c_sched, groups, clip=CLIP)
    logprob_passes(policy, batch, groups, plan, reference=reference, critic=c)
    p_opt, p_sched = _optimizer(policy)
    sums = run_updates(policy, p_opt, p_sched, batch, groups, plan, critic=c)
    for name, m in (("policy", policy), ("critic", critic)):
        with torch.no_grad():
            for p in m[0].module.parameters():
                p.copy_(p.main_grad)
        _save(unwrap(m[0]), os.path.join(out, name))
    destroy_megatron_parallel()
    return {k: float(v) for k, v in sums.items() if k.startswith("critic/")}


def ppo_step_equivalence(rank: int, world: int, tmp: str, cases) -> dict:
    """``cases``: (name, layout kwargs, micro-batches per rank, packed, routing replay)."""
    hf = load_hf_config(tiny_hf_config("qwen3_moe"))
    data = _sequences(hf.vocab_size)
    seed = 77
    ref_grads, max_return = _reference(hf, data, seed, tmp)
    results = {}
    for name, kw, n_mb, packed, replay in cases:
        out = os.path.join(tmp, f"grads_{name}")
        metrics = _run_layout(hf, Layout(**kw), n_mb, data, seed, tmp, packed, out, replay)
        init_megatron_parallel(Layout(), seed)
        errs = {}
        for which in ("policy", "critic"):
            [model], _ = build_model(hf, Layout(), ModelOptions(), ddp=False,
                                     value_head=which == "critic")
            _load(model, os.path.join(out, which))
            ref = ref_grads[which]
            errs.update({f"{which}:{n}": float((p.detach() - ref[n]).abs().max()
                                               / ref[n].abs().max().clamp_min(1e-30))
                         for n, p in model.named_parameters()})
        destroy_megatron_parallel()
        worst = max(errs, key=errs.get)
        results[name] = {"grad": errs[worst], "worst_param": worst, "max_return": max_return,
                         "critic_metrics": metrics}
    dist.barrier()
    return results
