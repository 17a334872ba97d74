"""The engine's recorded expert routes against Megatron's live routers (vLLM CPU build, fp32).

``route_fidelity``: engine and trainer from the same checkpoint; responses sampled with their
routes (``rollout.routes.RouteRecorder``). Measured on the trainer (the production batch builder,
the routers' own agreement count, the trainer's log-probs against the engine's):
1. same weights: Megatron's live routes equal the engine's;
2. the engine's routers perturbed (synced in with noise): without replay the routers disagree
   and the log-probs drift apart; replaying the engine's routes (R3) makes Megatron use exactly
   the engine's experts and the log-prob gap drops.
"""

from __future__ import annotations

import os
import zlib
from typing import Dict, Iterator, Tuple

import torch

NOISE = 0.15      # relative to the router weights' scale: flips a share of close top-k choices


def _perturbed(weights: Iterator[Tuple[str, torch.Tensor]]):
    """The trainer's HF tensors with noise on every MoE router (``mlp.gate.weight``), seeded by
    name so that every rank adds the same."""
    for name, t in weights:
        if name.endswith("mlp.gate.weight"):
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            t = t + NOISE * t.abs().mean() * torch.randn(t.shape, generator=g).to(t.dtype)
        yield name, t


def _measure(model, pg, samples, control, spec, replay: bool) -> Dict:
    """One forward of the trainer over ``samples`` (every group one micro-batch row set)."""
    from megatron_rl.algo.mismatch import mismatch_gap
    from megatron_rl.parallel.loss import logprobs_entropy
    from megatron_rl.train.megatron_loss import model_forward
    from megatron_rl.train.rl_batch import build_step_batch, group_sequences

    groups = [group_sequences(g[0].prompt_ids, g, route_shape=(len(spec.layers), spec.top_k))
              for g in samples]
    batch = build_step_batch(groups, [torch.zeros(len(g)) for g in groups], len(groups), pg,
                             cp_size=1, cp_rank=0, packed=False, device="cpu",
                             route_layers=control.layers, replay_rollout_routes=replay)
    [mb] = batch.micro_batches
    control.take_agreement()
    with torch.no_grad():
        logits = model_forward(mb, model, record_routes=replay, measure=True)
        lp, _ = logprobs_entropy(mb.shard, logits, mb.labels, tp_group=pg.tp,
                                 vocab_start=pg.tp_rank * logits.shape[-1])
    agree = control.take_agreement()
    known = mb.engine_routes[:, 0, 0] >= 0
    gap = mismatch_gap(lp.double(), mb.rollout_logprobs.double(), mb.shard.mask.double())
    n = float(mb.shard.mask.sum())
    out = {"agreement": float(agree[0] / agree[1]), "slots": float(agree[1]),
           "gap_mean": float(gap["abs"].sum()) / n, "gap_max": float(gap["abs"].max()),
           "k3_mean": float(gap["k3"].sum()) / n}
    if replay:   # the routes the routers used (recorded after replay) against the engine's
        used = mb.routes
        out["replayed_equal"] = float((used[known] == mb.engine_routes[known]).all(-1).double().mean())
    return out


def route_fidelity(rank: int, world: int, tmp: str, hf_dir: str, tp: int = 1) -> Dict:
    from megatron_rl.checkpoint.convert import _build, export_hf, import_hf
    from megatron_rl.checkpoint.dist_ckpt import load_model
    from megatron_rl.checkpoint.hf_mapping import mapping_for
    from megatron_rl.checkpoint.hf_weights import iter_hf_weights
    from megatron_rl.model.hf_config import load_hf_config
    from megatron_rl.parallel.config import Layout
    from megatron_rl.parallel.groups import build_groups
    from megatron_rl.rollout.engine import EngineSettings, RolloutEngine
    from megatron_rl.rollout.routes import RouteSpec
    from megatron_rl.rollout.weight_sync import sync_weights
    from megatron_rl.model.routing_replay import route_control

    ck, ex = os.path.join(tmp, "mc"), os.path.join(tmp, "hf_out")
    import_hf(hf_dir, ck)
    export_hf(ck, ex)
    hf = load_hf_config(ex)
    spec = RouteSpec.of(hf)
    engine = RolloutEngine(EngineSettings(ex, tensor_parallel_size=tp, dtype="float32",
                                          max_model_len=128, seed=1, routes=spec))
    model, wgroups = _build(hf, Layout(tp=tp), torch.float32)
    load_model(ck, model)
    pg = build_groups(tp, 1, 1)
    control = route_control(model)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, hf.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(4, 12, (8,), generator=g)]
    gen = lambda: engine.generate(prompts, n=4, max_tokens=16, seed=11)   # noqa: E731
    same = _measure(model, pg, gen(), control, spec, replay=False)
    weights = iter_hf_weights(model, mapping_for(hf), wgroups, hf.num_experts, dst=None)
    sync_weights(engine, _perturbed(weights), 2**20)
    moved = gen()
    result = {"same_weights": same, "perturbed_live": _measure(model, pg, moved, control, spec, False),
              "perturbed_replayed": _measure(model, pg, moved, control, spec, True),
              "payload": [list(moved[0][0].routed_experts.shape), str(moved[0][0].routed_experts.dtype),
                          len(moved[0][0].prompt_ids) + len(moved[0][0].token_ids)]}
    engine.shutdown()   # vLLM tears torch.distributed down with it: last
    return result
