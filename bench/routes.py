"""Expert routes (R3): how many bytes a step carries, and what recording them costs the CPU engine.

    .venv/bin/python bench/routes.py memory      # arithmetic: the shipped GPU recipes at 8k tokens
    .venv/bin/python bench/routes.py recorder    # vLLM CPU: generation with / without recording

``memory``: int16 ``[tokens, MoE layers, top-k]`` per response, from the models' own configs
(configs/models). A step's routes against what each rank holds: ours sends a group's routes only
to the data-parallel rank that trains on it (``parallel.rollout_comm.scatter_by_key``); the
baseline all-gathers every response's routes to every rank, as the step's token ids are. Then the
share a rank's routers replay (its CP and sequence-parallel share of the tokens, its stage's
layers).

``recorder``: CPU seconds of ``RolloutEngine.generate`` on a tiny and a mid-size random MoE, with
the route recorder against without it, in the same process (best of 3 after a warm-up).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (model dir, responses per step, DP, TP (sequence parallel), CP, PP) of the shipped GPU recipes
RECIPES = {
    "Qwen3-30B-A3B (qwen3_30b_a3b_8xh100)": ("qwen3_30b_a3b", 64 * 8, 2, 4, 1, 1),
    "Qwen3-30B-A3B (qwen3_30b_a3b_32xh100)": ("qwen3_30b_a3b", 256 * 8, 4, 4, 1, 2),
    "DeepSeek-V3 (deepseek_v3_256xh100)": ("deepseek_v3", 512 * 16, 32, 8, 1, 1),
}
TOKENS = 8192


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB" if n < 2**30 else f"{n / 2**30:,.2f} GB"


def memory() -> None:
    from megatron_rl.model.hf_config import load_hf_config
    from megatron_rl.rollout.routes import RouteSpec

    print(f"{'recipe':40s} {'B/token':>8s} {'per 8k resp':>12s} {'step':>10s} "
          f"{'all-gather/rank':>16s} {'ours/rank':>10s} {'ratio':>6s} {'replayed/rank':>14s}")
    for name, (model, responses, dp, tp, cp, pp) in RECIPES.items():
        spec = RouteSpec.of(load_hf_config(str(ROOT / "configs" / "models" / model)))
        per_token = spec.bytes_per_token()
        per_resp = per_token * TOKENS
        step = per_resp * responses
        ours = step / dp
        replayed = ours / (tp * cp * pp)
        print(f"{name:40s} {per_token:8,d} {_mb(per_resp):>12s} {_mb(step):>10s} {_mb(step):>16s} "
              f"{_mb(ours):>10s} {step / ours:5.0f}x {_mb(replayed):>14s}")


def _engine(model_dir: str, record: bool):
    from megatron_rl.model.hf_config import load_hf_config
    from megatron_rl.rollout.engine import EngineSettings, RolloutEngine
    from megatron_rl.rollout.routes import RouteSpec

    spec = RouteSpec.of(load_hf_config(model_dir)) if record else None
    return RolloutEngine(EngineSettings(model_dir, dtype="float32", max_model_len=2048, seed=1,
                                        cpu_kv_cache_gb=1.0, routes=spec))


def recorder() -> None:
    import torch

    from megatron_rl.model.tiny import write_tiny_hf_model

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    sizes = {"tiny (hidden 64, 2 layers, 4 experts)": {},
             "mid (hidden 512, 4 layers, 8 experts of 256)": dict(
                 hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                 head_dim=64, num_experts=8, moe_intermediate_size=256, vocab_size=4096)}
    print(f"{'model':46s} {'resp':>5s} {'reqs':>5s} {'plain s':>8s} {'recorded s':>10s} {'ratio':>6s}")
    with tempfile.TemporaryDirectory() as d:
        for label, over in sizes.items():
            path = os.path.join(d, str(abs(hash(label))))
            write_tiny_hf_model("qwen3_moe", path, seed=0, **over)
            for resp, reqs in ((128, 64), (1024, 16)):
                times = {}
                for record in (False, True):
                    engine = _engine(path, record)
                    prompts = [[5 + (i % 50), 7, 9, 11] for i in range(reqs // 4)]
                    run = lambda: engine.generate(prompts, n=4, max_tokens=resp, seed=3,  # noqa: E731
                                                  ignore_eos=True)
                    run()
                    best = float("inf")
                    for _ in range(3):
                        t0 = time.process_time()
                        run()
                        best = min(best, time.process_time() - t0)
                    times[record] = best
                    engine.shutdown()
                print(f"{label:46s} {resp:5d} {reqs:5d} {times[False]:8.3f} {times[True]:10.3f} "
                      f"{times[True] / times[False]:6.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("memory", "recorder"))
    args = p.parse_args()
    memory() if args.what == "memory" else recorder()


if __name__ == "__main__":
    main()
