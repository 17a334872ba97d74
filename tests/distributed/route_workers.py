"""Routing replay from the rollout engine (R3) through the Megatron model on CPU.

``route_equivalence``: the engine's routes (random distinct top-k ids, so that they differ from
the live router's on most tokens; none for each sequence's last token and for one whole
sequence, which route live) are replayed in one RL step under a parallel layout, through the
production batch builder; the loss and every gradient must equal a single process replaying the
same routes, laid out in the router's order by a brute-force loop. Two mutants must not: the
layout without replay, and the layout with every sequence's routes shifted by one token.

``route_checks``: on one process, what the replay hook itself promises (gates of replayed experts
outside the live top-k, recording, the agreement count, the order of tokens in the router).
"""

from __future__ import annotations

import os
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron_rl.model.build import ModelOptions
from megatron_rl.model.hf_config import load_hf_config
from megatron_rl.model.tiny import tiny_hf_config
from megatron_rl.parallel.config import Layout
from megatron_rl.parallel.groups import ParallelGroups
from megatron_rl.parallel.loss import step_denominators
from megatron_rl.train.batches import build_micro_batch
from megatron_rl.train.megatron_loss import PolicyLoss, _loss_func, train_forward_backward
from megatron_rl.runtime.model_setup import build_model, unwrap
from megatron_rl.runtime.parallel_init import destroy_megatron_parallel, init_megatron_parallel
from megatron_rl.model.routing_replay import route_control

from tests.distributed.model_workers import (LOSSES, NSEQ, S, _advantages, _finish_layout, _load,
                                             _micro_batches, _save, _sequences)

MISSING_SEQ = 5   # the engine returned no routes for this sequence


def engine_routes(hf, data, seed: int = 3) -> torch.Tensor:
    """``[NSEQ, S, L, K]`` int16: random distinct experts per token and MoE layer; -1 where the
    engine has none (past each sequence's end, its last token, all of ``MISSING_SEQ``)."""
    g = torch.Generator().manual_seed(seed)
    L, E, K = len(hf.moe_layers), hf.num_experts, hf.moe_top_k
    ids = torch.rand(NSEQ, S, L, E, generator=g).argsort(-1)[..., :K].to(torch.int16)
    for b in range(NSEQ):
        n = int(data["loss_mask"][b].nonzero().max()) + 1
        ids[b, n - 1:] = -1
    ids[MISSING_SEQ] = -1
    return ids


def router_order_by_loop(routes: torch.Tensor, rows: List[int]) -> torch.Tensor:
    """The routers' token order of a BSHD batch of ``rows`` (``[b, S]`` tokens become ``[S, b]``,
    flattened), one token at a time."""
    return torch.stack([routes[b, s] for s in range(routes.shape[1]) for b in rows])


def _reference(hf, data, adv, routes, loss_name, params, seed):
    init_megatron_parallel(Layout(), seed)
    [model], _ = build_model(hf, Layout(), ModelOptions(), ddp=False)
    [mb] = _micro_batches(data, adv, [list(range(NSEQ))], None)
    mb.routes = router_order_by_loop(routes, list(range(NSEQ)))
    nt, ns = step_denominators([mb.shard], None)
    control = route_control(model)
    with control.active(replay=mb.routes):
        logits = model(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=None)
    value, _ = _loss_func(mb, PolicyLoss(loss_name, params, nt, ns), ParallelGroups(), 1.0, None, logits)
    value.backward()
    return model, float(value), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _layout_batches(data, adv, routes, rows_list, groups, packed, layers, mutation):
    out = []
    for rows in rows_list:
        seqs = []
        for b in rows:
            n = int(data["loss_mask"][b].nonzero().max()) + 1
            r = routes[b, :n]
            if mutation == "shift":   # every route one token late
                r = torch.cat([r[:1], r[:-1]])
            seqs.append({"tokens": data["tokens"][b, :n], "loss_mask": data["loss_mask"][b, :n],
                         "old_logprobs": data["old"][b, :n], "advantages": adv[b, :n], "routes": r})
        mb = build_micro_batch(seqs, data["groups"][rows], packed=packed, cp_size=groups.cp_size,
                               cp_rank=groups.cp_rank, cp_group=groups.cp, tp_size=groups.tp_size,
                               tp_rank=groups.tp_rank, route_layers=layers)
        mb.routes = None if mutation == "drop" else mb.engine_routes
        out.append(mb)
    return out


def _run_layout(hf, layout, n_mb, data, adv, routes, loss_name, params, seed, weights, out_dir,
                packed, mutation):
    groups = init_megatron_parallel(layout, seed)
    [model], _ = build_model(hf, layout, ModelOptions())
    _load(unwrap(model), weights)
    control = route_control(model)
    mine = [b for b in range(NSEQ) if b % groups.dp_size == groups.dp_rank]
    rows = [mine[i::n_mb] for i in range(n_mb)]
    mbs = _layout_batches(data, adv, routes, rows, groups, packed,
                          None if control is None else control.layers, mutation)
    nt, ns = step_denominators([m.shard for m in mbs], groups.dp_cp)
    logged = train_forward_backward([model], mbs, PolicyLoss(loss_name, params, nt, ns), groups)
    return _finish_layout(model, groups, [float(x["loss"]) for x in logged], out_dir)


def route_equivalence(rank: int, world: int, tmp: str, cases, model: str = "qwen3_moe") -> Dict:
    """``cases``: (name, layout kwargs, micro-batches per DP rank, loss, packed, mutation)."""
    hf = load_hf_config(tiny_hf_config(model))
    data = _sequences(hf.vocab_size)
    routes = engine_routes(hf, data)
    seed, weights, refs, results = 1234, os.path.join(tmp, "weights"), {}, {}
    saved = False   # a collective save: every rank takes the same branch
    for name, kw, n_mb, loss_name, packed, mutation in cases:
        adv_name, adv_params, params = LOSSES[loss_name]
        adv = _advantages(data, adv_name, adv_params)
        if loss_name not in refs:
            ref_model, value, grads = _reference(hf, data, adv, routes, loss_name, params, seed)
            if not saved:   # the same seed builds the same weights every time
                _save(ref_model, weights)
                saved = True
            refs[loss_name] = (value, grads)
            destroy_megatron_parallel()
        value, ref_grads = refs[loss_name]
        out = os.path.join(tmp, f"grads_{name}")
        loss = _run_layout(hf, Layout(**kw), n_mb, data, adv, routes, loss_name, params, seed,
                           weights, out, packed, mutation)
        dist.all_reduce(loss)
        init_megatron_parallel(Layout(), seed)
        [m], _ = build_model(hf, Layout(), ModelOptions(), ddp=False)
        _load(m, out)
        errs = {n: float((p.detach() - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-30))
                for n, p in m.named_parameters()}
        destroy_megatron_parallel()
        worst = max(errs, key=errs.get)
        results[name] = {"grad": errs[worst], "worst_param": worst,
                         "loss": abs(float(loss[0]) - value) / abs(value)}
    return results


def _router_outputs(model):
    """Each MoE router's ``(probs, routing_map)`` of the last forward, by layer (forward hooks)."""
    seen: Dict[int, tuple] = {}
    for layer in unwrap(model).decoder.layers:
        router = getattr(layer.mlp, "router", None)
        if router is not None:
            router.register_forward_hook(
                lambda m, i, o, n=int(layer.layer_number): seen.__setitem__(n, o))
    return seen


def route_checks(rank: int, world: int, model: str = "qwen3_moe") -> Dict:
    """One process: replayed experts outside the live top-k get a gate and a gradient; recording
    returns the routes used; the agreement counts matching slots; routes for the wrong number of
    tokens are refused."""
    hf = load_hf_config(tiny_hf_config(model))
    init_megatron_parallel(Layout(), 5)
    [m], _ = build_model(hf, Layout(), ModelOptions(), ddp=False)
    control = route_control(m)
    data = _sequences(hf.vocab_size)
    adv = _advantages(data, "grpo", {})
    [mb] = _micro_batches(data, adv, [list(range(NSEQ))], None)
    outputs = _router_outputs(m)

    def forward(**kw):
        with control.active(**kw):
            return m(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=None)

    with torch.no_grad():
        forward(record=True)
    live = control.merge_recorded(None).long()                              # [N, L, K]
    # replace each token's second choice with an expert the live router did not pick
    E = hf.num_experts
    unpicked = torch.stack([torch.tensor([e for e in range(E) if e not in row][0]) for row in
                            live.reshape(-1, live.shape[-1]).tolist()]).view(live.shape[:-1])
    target = live.clone()
    target[..., -1] = unpicked
    target[: S // 2] = -1                                                   # half the tokens live
    m.zero_grad()
    forward(replay=target.to(torch.int16), record=True)
    used = control.merge_recorded(None).long()
    known = target[:, 0, 0] >= 0
    gates, grads = [], []
    for i, layer in enumerate(sorted(outputs)):
        probs = outputs[layer][0]
        rows = known.nonzero()[:, 0]
        experts = target[rows, i, -1]
        g = probs[rows, experts]
        gates.append(float(g.min()))
        router = [lyr.mlp.router for lyr in unwrap(m).decoder.layers
                  if int(lyr.layer_number) == layer][0]
        router.weight.grad = None
        g.sum().backward(retain_graph=True)
        grads.append(float(router.weight.grad[experts.unique()].abs().sum(-1).min()))
    with torch.no_grad():
        control.take_agreement()
        forward(compare=live.to(torch.int16))
        same = control.take_agreement().tolist()
        forward(compare=target.to(torch.int16))
        half = control.take_agreement().tolist()
        try:
            forward(replay=target[1:].to(torch.int16))
            refused = ""
        except ValueError as e:
            refused = str(e)
    destroy_megatron_parallel()
    K = live.shape[-1]
    return {"replayed_used": bool(torch.equal(used[known], target[known])),
            "live_used_where_unknown": bool(torch.equal(used[~known], live[~known])),
            "min_gate_outside_live_topk": min(gates), "min_router_grad": min(grads),
            "agree_all": same[0] / same[1], "agree_changed": half[0] / half[1],
            "expected_changed": (K - 1) / K, "refused": refused}
