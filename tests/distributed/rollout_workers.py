"""vLLM engine + Megatron trainer in one process: weight sync and the probe mismatch."""

from __future__ import annotations

import os
from typing import Dict, List

import torch


def _megatron_logprobs(model, samples, tp_group=None) -> List[torch.Tensor]:
    from megatron_rl.parallel.collectives import group_size
    from megatron_rl.parallel.weight_comm import gather_pieces
    from megatron_rl.rollout.weight_sync import sequence_logprobs

    out = []
    with torch.no_grad():
        for s in samples:
            ids = s.prompt_ids + s.token_ids
            n = -(-len(ids) // group_size(tp_group)) * group_size(tp_group)  # sequence parallel
            t = torch.tensor([ids + [0] * (n - len(ids))])  # causal: trailing pad changes nothing
            logits = model(input_ids=t, position_ids=torch.arange(n)[None], attention_mask=None)
            full = torch.cat(gather_pieces(logits[0], tp_group), -1)
            out.append(sequence_logprobs(full, ids, len(s.prompt_ids)))
    return out


def _mismatch(samples, ours) -> float:
    return max(float((torch.tensor(s.logprobs) - o).abs().max()) for s, o in zip(samples, ours))


def _seeded_turns(engine) -> Dict:
    """Multi-turn engine calls: one seeded request per episode, 300 contexts of 100 tokens (more
    than one scheduler step's token budget, where vLLM's CPU runner used to crash rewinding a
    seeded generator). The same seeds draw the same tokens; identical contexts with different
    seeds draw differently."""
    g = torch.Generator().manual_seed(5)
    ctx = [torch.randint(3, 200, (100,), generator=g).tolist() for _ in range(150)]
    prompts = ctx + ctx
    seeds = list(range(300))
    a = [s.token_ids for s in engine.generate_each(prompts, [6] * 300, seeds)]
    b = [s.token_ids for s in engine.generate_each(prompts, [6] * 300, seeds)]
    return {"seeded_repeat_equal": a == b,
            "seeded_twins_differ": sum(x != y for x, y in zip(a[:150], a[150:]))}


def sync_after_update(rank: int, world: int, tmp: str, hf_dir: str, tp: int = 1,
                      bucket_mb: float = 0.05) -> Dict:
    """Engine from the export; trainer on the imported checkpoint. Generate (engine == trainer),
    one optimizer step (engine now stale), sync (engine == new trainer, != old)."""
    from megatron_rl.checkpoint.convert import _build, export_hf, import_hf
    from megatron_rl.checkpoint.dist_ckpt import load_model
    from megatron_rl.checkpoint.hf_mapping import mapping_for
    from megatron_rl.checkpoint.hf_weights import iter_hf_weights
    from megatron_rl.model.hf_config import load_hf_config
    from megatron_rl.parallel.config import Layout
    from megatron_rl.rollout.engine import EngineSettings, RolloutEngine
    from megatron_rl.rollout.weight_sync import sync_weights

    ck, ex = os.path.join(tmp, "mc"), os.path.join(tmp, "hf_out")
    import_hf(hf_dir, ck)
    export_hf(ck, ex)
    engine = RolloutEngine(EngineSettings(ex, tensor_parallel_size=tp, dtype="float32",
                                          max_model_len=128, seed=1))
    hf = load_hf_config(ex)
    layout = Layout(tp=tp)
    model, groups = _build(hf, layout, torch.float32)
    load_model(ck, model)
    prompts = [[5, 17, 3, 99, 42], [7, 8, 9, 10, 11, 12, 13, 14]]
    gen = lambda: [s for g in engine.generate(prompts, n=2, max_tokens=12) for s in g]  # noqa: E731
    before = gen()
    same_weights = _mismatch(before, _megatron_logprobs(model, before, groups.tp))
    # one "optimizer step": move every weight (the trainer's update, without the loss plumbing)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype) * p.abs().mean())
    stale = gen()
    new_lp = _megatron_logprobs(model, stale, groups.tp)
    stale_gap = _mismatch(stale, new_lp)
    weights = iter_hf_weights(model, mapping_for(hf), groups, hf.num_experts, dst=None)
    stats = sync_weights(engine, weights, int(bucket_mb * 2**20))
    after = gen()
    synced = _mismatch(after, _megatron_logprobs(model, after, groups.tp))
    seeded = _seeded_turns(engine)
    engine.shutdown()  # vLLM tears torch.distributed down with it: last
    return {"same_weights": same_weights, "stale_gap": stale_gap, "synced": synced,
            "sync_s": stats.seconds, "buckets": stats.buckets, "tensors": stats.tensors,
            "bytes": stats.bytes, "max_bucket_bytes": stats.max_bucket_bytes,
            "repacked": stats.repacked_moe_layers, **seeded}
