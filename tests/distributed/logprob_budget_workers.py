"""Worker for test_logprob_budget: one step's forward-only passes through the trainer's path
(``rollout_batch.step_batch`` -> ``rl_batch.logprob_passes``) with the training micro-batches and
with them merged under ``logprob_max_tokens`` (``train.logprob_max_tokens_per_micro_batch``), on
the same model and rollouts; then the step's gradient from each. Each rank compares what it
holds; the worst difference over the ranks comes back."""

from __future__ import annotations

import torch
import torch.distributed as dist

import megatron_rl.train.rl_batch as rl_batch
from megatron_rl.model.build import ModelOptions
from megatron_rl.model.hf_config import load_hf_config
from megatron_rl.model.routing_replay import route_control
from megatron_rl.model.tiny import tiny_hf_config
from megatron_rl.parallel.config import Layout
from megatron_rl.rollout.routes import RouteSpec
from megatron_rl.runtime.model_setup import build_model
from megatron_rl.runtime.parallel_init import destroy_megatron_parallel, init_megatron_parallel
from megatron_rl.train.critic import Critic
from megatron_rl.train.reference import HostWeights
from megatron_rl.train.rl_batch import StepPlan, logprob_passes, run_updates
from megatron_rl.train.rollout_batch import BatchShape, step_batch
from tests.distributed.budget_workers import ragged_rollouts

SEED = 7


def _with_engine_routes(rollouts, spec: RouteSpec, seed: int = 1):
    """Random engine routes (distinct experts per token and layer) on every sample (R3)."""
    g = torch.Generator().manual_seed(seed)
    for group in rollouts.samples:
        for s in group:
            n = len(s.prompt_ids) + len(s.token_ids) - 1
            scores = torch.rand(n, len(spec.layers), spec.num_experts, generator=g)
            s.routed_experts = scores.argsort(-1)[..., :spec.top_k].to(torch.int16).numpy()
    return rollouts


def _passes(model, rollouts, shape, pg, plan, reference, critic):
    """The batch after the step's passes, and its policy gradient (the optimizer step captured;
    the critic is not updated, so both paths see its same weights)."""
    grads = []

    def capture(optimizer, scheduler, bad, group):
        grads.append(torch.cat([p.main_grad.reshape(-1).clone() for p in model[0].parameters()]))
        return False, 0.0, None

    batch = step_batch(rollouts, shape, pg, torch.device("cpu"))
    logprob_passes(model, batch, pg, plan, reference, critic=critic)
    seen = {"values": batch.values if batch.has_logprobs and batch.values else [],"old": [m.old_logprobs for m in batch.micro_batches] if batch.has_logprobs else [],
            "ref": [r for r in batch.ref if r is not None],
            "measured": [m.trainer_logprobs for m in batch.micro_batches
                         if m.trainer_logprobs is not None],
            "routes": [m.routes for m in batch.micro_batches if m.routes is not None]}
    real = rl_batch.optimizer_step
    rl_batch.optimizer_step = capture
    try:
        run_updates(model, None, None, batch, pg, plan)
    finally:
        rl_batch.optimizer_step = real
    return batch, seen, grads[0]


def _worst(a, b) -> float:
    if len(a) != len(b):
        return float("inf")
    return max([float((x.double() - y.double()).abs().max()) for x, y in zip(a, b)] or [0.0])


def logprob_budget_equivalence(rank: int, world: int, cases) -> dict:
    """``cases``: (name, layout kwargs, routing_replay, reference KL, log-prob budget, critic)."""
    hf = load_hf_config(tiny_hf_config("qwen3_moe"))
    spec = RouteSpec.of(hf)
    out = {}
    for name, kw, routing, kl, budget, with_critic in cases:
        layout = Layout(**kw)
        pg = init_megatron_parallel(layout, SEED)
        model, _ = build_model(hf, layout, ModelOptions(), distributed_optimizer=False)
        critic = _critic(hf, layout, pg) if with_critic else None
        control = route_control(model[0])
        reference = HostWeights(model) if kl else None
        if kl:   # the reference differs from the policy, so its pass is no copy of the old one
            with torch.no_grad():
                for p in model[0].parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        params = {"eps_low": 0.2, "eps_high": 0.2, **({"kl_coef": 0.1} if kl else {})}
        estimator = ("gae", {"gamma": 0.97, "lam": 0.9}) if with_critic else ("grpo", {})
        plan = StepPlan(*estimator, "gspo", params,
                        routing_replay=routing, separate_old_pass=True, needs_reference=kl,
                        packed=True)
        common = dict(dp=pg.dp_size, dp_rank=pg.dp_rank, groups_per_micro_batch=1,
                      cp_size=pg.cp_size, cp_rank=pg.cp_rank, packed=True,
                      advantage=plan.advantage, tp_size=pg.tp_size,
                      route_shape=(len(spec.layers), spec.top_k) if routing == "rollout" else None,
                      route_layers=None if control is None else control.layers,
                      replay_rollout_routes=routing == "rollout")
        a_batch, a, a_grad = _passes(model, _rollouts(hf, spec, routing), BatchShape(**common), pg, plan, reference,
                                   critic)
        b_batch, b, b_grad = _passes(model, _rollouts(hf, spec, routing), BatchShape(
            logprob_max_tokens=budget, **common), pg, plan, reference, critic)
        worst = torch.tensor([_worst(a["old"], b["old"]), _worst(a["ref"], b["ref"]),
                              _worst(a["values"], b["values"]),
                              _worst(a["measured"], b["measured"]),
                              float(any(not torch.equal(x, y)
                                        for x, y in zip(a["routes"], b["routes"]))
                                    or len(a["routes"]) != len(b["routes"])),
                              float((a_grad - b_grad).abs().max())], dtype=torch.float64)
        worst = worst[[0, 1, 3, 4, 5, 2]]      # values last
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        held = torch.tensor([float(len(a["routes"]) > 0), float(len(a["ref"]) > 0),
                             float(len(a["old"]) > 0), float(len(a["values"]) > 0)])
        dist.all_reduce(held, op=dist.ReduceOp.MAX)
        out[name] = {"old": float(worst[0]), "ref": float(worst[1]), "measured": float(worst[2]),
                     "routes_differ": bool(worst[3]), "grad": float(worst[4]),
                     "grad_scale": float(a_grad.abs().max()),
                     "had_routes": bool(held[0]), "had_ref": bool(held[1]),
                     "had_old": bool(held[2]), "had_values": bool(held[3]),
                     "values": float(worst[5]),
                     "passes": (len(a_batch.micro_batches),
                                b_batch.plan_metrics["batch/logprob_micro_batches"])}
        destroy_megatron_parallel()
    return out



def _critic(hf, layout, pg):
    """A critic on the policy's layout (its own random trunk and head), never updated here."""
    critic, _ = build_model(hf, layout, ModelOptions(), distributed_optimizer=False,
                            value_head=True)
    return Critic(critic, None, None, pg, clip=0.2)


def _rollouts(hf, spec, routing):
    """The step's rollouts, afresh for each path (``step_batch`` drops the samples' routes)."""
    rollouts = ragged_rollouts(hf.vocab_size)
    return _with_engine_routes(rollouts, spec) if routing == "rollout" else rollouts
