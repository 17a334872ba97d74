"""vLLM rollout throughput and trainer -> engine weight-sync time, against baselines in the same run.

    python bench/rollout.py                  # tiny Qwen3-MoE, 64 prompts x 8 samples x 32 tokens

Rollout: generated tokens/s of ``RolloutEngine.generate`` (CPU build, fp32, eager), against the
same engine generating one sample per prompt (the batching gain). Weight sync: ``sync_weights``
from the Megatron model (HF weight iterator, 1 MiB buckets, MoE re-pack), against vLLM reloading
the same weights from the exported safetensors directory on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def _bench(rank, world, tmp, prompts, n, max_tokens):
    import torch

    from megatron_rl.checkpoint.convert import _build, export_hf, import_hf
    from megatron_rl.checkpoint.dist_ckpt import load_model
    from megatron_rl.checkpoint.hf_mapping import mapping_for
    from megatron_rl.checkpoint.hf_weights import iter_hf_weights
    from megatron_rl.model.hf_config import load_hf_config
    from megatron_rl.model.tiny import write_tiny_hf_model
    from megatron_rl.parallel.config import Layout
    from megatron_rl.rollout.engine import EngineSettings, RolloutEngine
    from megatron_rl.rollout.weight_sync import sync_weights

    hf_dir, ck, ex = (os.path.join(tmp, x) for x in ("hf", "mc", "out"))
    write_tiny_hf_model("qwen3_moe", hf_dir, seed=0)
    import_hf(hf_dir, ck)
    export_hf(ck, ex)
    engine = RolloutEngine(EngineSettings(ex, dtype="float32", max_model_len=256, seed=0))
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(3, 200, (16,), generator=g).tolist() for _ in range(prompts)]

    def gen(k):
        engine.generate(ps[:4], n=k, max_tokens=8)  # warm
        t = time.perf_counter()
        out = engine.generate(ps, n=k, max_tokens=max_tokens)
        sec = time.perf_counter() - t
        return sum(len(s.token_ids) for grp in out for s in grp) / sec

    res = {"grouped_tokens_per_s": gen(n), "single_tokens_per_s": gen(1)}
    hf = load_hf_config(ex)
    model, groups = _build(hf, Layout(), torch.float32)
    load_model(ck, model)
    syncs, disk = [], []
    for _ in range(3):
        stats = sync_weights(engine, iter_hf_weights(model, mapping_for(hf), groups, hf.num_experts),
                             1 << 20)
        syncs.append(stats.seconds)
        t = time.perf_counter()
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": ex})
        disk.append(time.perf_counter() - t)
    res.update(sync_s=min(syncs), disk_reload_s=min(disk), sync_mb=stats.bytes / 2**20,
               buckets=stats.buckets)
    engine.shutdown()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    from tests.distributed.harness import spawn

    with tempfile.TemporaryDirectory() as tmp:
        res = spawn(_bench, 1, tmp, args.prompts, args.n, args.max_tokens)
    res["grouped_over_single"] = res["grouped_tokens_per_s"] / res["single_tokens_per_s"]
    res["sync_over_disk_reload"] = res["sync_s"] / res["disk_reload_s"]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
