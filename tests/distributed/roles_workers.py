"""Workers for separate placement's process groups (``parallel.roles``, ``parallel.weight_stream``)
at world 3: global rank 0 is the engine, ranks 1 and 2 train."""

from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_rl.parallel import roles as R
from megatron_rl.parallel import weight_stream as W
from tests.distributed.harness import own_world


def _version(v: int):
    """Version ``v`` of a small 'model': tensors of three dtypes, one larger than a bucket."""
    g = torch.Generator().manual_seed(v)
    return [("a.weight", torch.randn(4, 3, generator=g)),
            ("b.bias", torch.randn(7, generator=g).to(torch.bfloat16)),
            ("c.big", torch.randn(64, 64, generator=g, dtype=torch.float64)),
            ("d.ids", torch.arange(5) + v)]


def _buckets(tensors, bucket_bytes: int):
    from megatron_rl.checkpoint.hf_weights import iter_hf_buckets

    return iter_hf_buckets(iter(tensors), bucket_bytes)


@own_world
def split_and_stream(rank: int, world: int, versions: int, engine_ranks: int = 1):
    """Each role's default group spans only its role; three versions and a batch cross; stop."""
    roles = R.init_roles(engine_ranks, timeout=timedelta(seconds=120))
    seen = torch.tensor([float(rank)])
    dist.all_reduce(seen)                      # over the role's default group only
    out = {"role": roles.role, "role_rank": roles.rank, "role_size": roles.size,
           "role_sum": float(seen), "default_world": dist.get_world_size()}
    if roles.is_engine:
        got = []
        while True:
            v, tensors, code = W.recv_version(roles.weights)
            if v == W.STOP:
                out["exit_code"] = code
                break
            want = _version(v)
            got.append({"version": v, "names": [n for n, _ in tensors],
                        "exact": all(torch.equal(t, w) and t.dtype == w.dtype
                                     for (_, t), (_, w) in zip(tensors, want))
                        and len(tensors) == len(want)})
            if roles.batches is not None:
                R.send_object(roles.batches, {"step": v, "payload": list(range(v + 3))}, dst=1)
        out["versions"] = got
        out["trainer0"] = R.recv_object(roles.batches, src=1)   # what the trainers saw
    elif roles.rank == 0:
        sent, batches = [], []
        for v in range(versions):
            sent.append(W.send_version(roles.weights, v, _buckets(_version(v), 200)))
            batches.append(R.recv_object(roles.batches, src=0))
        W.send_stop(roles.weights, exit_code=75)
        out.update(sent=sent, batches=batches)
        R.send_object(roles.batches, out, dst=0)
    return out


def _perturb(model, seed: int) -> None:
    """An "optimizer step" that moves every weight (the update without the loss plumbing)."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype) * p.abs().mean())


def _engine_refits(roles, bucket_bytes: int) -> dict:
    """Engine rank: start from the trainer's export, then apply each streamed version and sample."""
    from megatron_rl.rollout.engine import EngineSettings, RolloutEngine
    from megatron_rl.rollout.weight_sync import sync_weights

    export = R.recv_object(roles.batches, src=1)
    engine = RolloutEngine(EngineSettings(export, tensor_parallel_size=1, dtype="float32",
                                          max_model_len=128, seed=1))
    prompts = [[5, 17, 3, 99, 42], [7, 8, 9, 10, 11, 12, 13, 14]]
    gen = lambda: [(s.prompt_ids, s.token_ids, s.logprobs)   # noqa: E731
                   for g in engine.generate(prompts, n=2, max_tokens=12) for s in g]
    applied = []
    while True:
        stale = gen()          # sampled by the previous version
        v, tensors, _ = W.recv_version(roles.weights)
        if v == W.STOP:
            break
        stats = sync_weights(engine, iter(tensors), bucket_bytes)
        applied.append({"version": v, "tensors": stats.tensors, "repacked": stats.repacked_moe_layers})
        R.send_object(roles.batches, {"version": v, "stale": stale, "fresh": gen()}, dst=1)
    result = R.recv_object(roles.batches, src=1)
    engine.shutdown()
    return {"applied": applied, **result}


def _trainer_refits(roles, tmp: str, hf_dir: str, versions: int, tp: int, bucket_bytes: int):
    """Trainer ranks (TP ``tp``): stream ``versions`` updates; score each version's samples."""
    import os

    from megatron_rl.checkpoint.convert import _build, export_hf, import_hf
    from megatron_rl.checkpoint.dist_ckpt import load_model
    from megatron_rl.checkpoint.hf_mapping import mapping_for
    from megatron_rl.checkpoint.hf_weights import iter_hf_buckets, iter_hf_weights
    from megatron_rl.model.hf_config import load_hf_config
    from megatron_rl.parallel.config import Layout
    from megatron_rl.rollout.engine import Sample
    from tests.distributed.rollout_workers import _megatron_logprobs, _mismatch

    ck, ex = os.path.join(tmp, "mc"), os.path.join(tmp, "hf_out")
    import_hf(hf_dir, ck)
    export_hf(ck, ex)
    hf = load_hf_config(ex)
    model, groups = _build(hf, Layout(tp=tp), torch.float32)
    load_model(ck, model)
    if roles.leads:
        R.send_object(roles.batches, ex, dst=0)
    rows = []
    for v in range(versions):
        _perturb(model, seed=v)
        weights = iter_hf_weights(model, mapping_for(hf), groups, hf.num_experts, dst=0)
        if roles.leads:
            W.send_version(roles.weights, v, iter_hf_buckets(weights, bucket_bytes))
            got = [R.recv_object(roles.batches, src=0)]
        else:
            for _ in weights:   # collective: every trainer rank walks the plan
                pass
            got = [None]
        dist.broadcast_object_list(got, src=0)
        samples = {k: [Sample(0, p, t, lp, "length") for p, t, lp in got[0][k]]
                   for k in ("stale", "fresh")}
        rows.append({"version": got[0]["version"],
                     **{k: _mismatch(s, _megatron_logprobs(model, s, groups.tp))
                        for k, s in samples.items()}})
    if roles.leads:
        W.send_stop(roles.weights)
        R.send_object(roles.batches, {"trainer": rows}, dst=0)


@own_world
def stream_refits(rank: int, world: int, tmp: str, hf_dir: str, versions: int, tp: int):
    """World 3: engine rank 0 (vLLM), trainer ranks 1-2 (Megatron, TP ``tp`` or DP); ``versions``
    weight versions streamed after as many updates, each applied between generation batches."""
    roles = R.init_roles(1, timeout=timedelta(seconds=300))
    bucket_bytes = 50 * 1024
    if roles.is_engine:
        return _engine_refits(roles, bucket_bytes)
    from megatron_rl.runtime.parallel_init import destroy_megatron_parallel

    try:
        _trainer_refits(roles, tmp, hf_dir, versions, tp, bucket_bytes)
    finally:
        destroy_megatron_parallel()
    return None
