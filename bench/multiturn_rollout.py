"""Multi-turn collection throughput against single-turn generation, in the same run.

    python bench/multiturn_rollout.py        # tiny Qwen3-MoE, 32 prompts x 8 episodes, 4 turns

Engine-generated tokens per second (actions only; observation tokens are not generated) of:
  single      ``RolloutEngine.generate``: one call, G samples per prompt, ``turns * turn_tokens``
  multi       ``rollout.multiturn.collect_episodes``: every live episode advances one turn per
              engine call (``generate_each``); a fixed environment answers each turn with
              ``obs_tokens`` token ids, so later turns re-read a longer context
  sequential  the same episodes one at a time (a subset; what batching turns saves)
Printed ratios: multi / single and multi / sequential.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def _bench(rank, world, tmp, prompts, n, turns, turn_tokens, obs_tokens, sequential_episodes):
    import torch

    from megatron_rl.data.prompts import PromptRow
    from megatron_rl.envs import Environment, StepResult
    from megatron_rl.model.tiny import write_tiny_hf_model
    from megatron_rl.rollout.engine import EngineSettings, RolloutEngine
    from megatron_rl.rollout.multiturn import EpisodeLimits, ObservationEncoder, collect_episodes

    hf_dir = os.path.join(tmp, "hf")
    write_tiny_hf_model("qwen3_moe", hf_dir, seed=0)
    total = turns * (turn_tokens + obs_tokens)
    engine = RolloutEngine(EngineSettings(hf_dir, dtype="float32", max_model_len=16 + total + 8,
                                          seed=0))
    g = torch.Generator().manual_seed(0)
    drawn = [(PromptRow(i, ""), torch.randint(3, 200, (16,), generator=g).tolist())
             for i in range(prompts)]

    class Fixed(Environment):
        def step(self, action):
            return StepResult(observation=list(range(10, 10 + obs_tokens)), tool_call=True)

    class Tok:
        eos_token_id, eos_token, chat_template = None, None, None

    limits = EpisodeLimits(turns, total, turn_tokens, obs_tokens)
    gen = lambda p, m, s: engine.generate_each(p, m, s)   # noqa: E731 (no stop token: fixed turns)

    def multi(rows):
        t = time.perf_counter()
        groups, _, failures, err = collect_episodes(rows, n, lambda row: Fixed(), gen, lambda ids: "",
                                                    ObservationEncoder(Tok(), False), limits, seed=1)
        assert not failures, err
        sec = time.perf_counter() - t
        return sum(sum(s.action_mask) for grp in groups for s in grp) / sec

    engine.generate([d[1] for d in drawn[:4]], n=2, max_tokens=8)   # warm
    t = time.perf_counter()
    out = engine.generate([d[1] for d in drawn], n=n, max_tokens=turns * turn_tokens, ignore_eos=True)
    single = sum(len(s.token_ids) for grp in out for s in grp) / (time.perf_counter() - t)
    res = {"single_tokens_per_s": single, "multi_tokens_per_s": multi(drawn)}
    seq_rows = drawn[:max(1, sequential_episodes // n)]
    t = time.perf_counter()
    gen_tokens = 0
    for row in seq_rows:
        for g_ in range(n):
            groups, _, _, _ = collect_episodes([row], 1, lambda r: Fixed(), gen, lambda ids: "",
                                               ObservationEncoder(Tok(), False), limits, seed=g_)
            gen_tokens += sum(groups[0][0].action_mask)
    res["sequential_tokens_per_s"] = gen_tokens / (time.perf_counter() - t)
    engine.shutdown()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--turn-tokens", type=int, default=8)
    ap.add_argument("--obs-tokens", type=int, default=8)
    ap.add_argument("--sequential-episodes", type=int, default=16)
    args = ap.parse_args()
    from tests.distributed.harness import spawn

    with tempfile.TemporaryDirectory() as tmp:
        res = spawn(_bench, 1, tmp, args.prompts, args.n, args.turns, args.turn_tokens,
                    args.obs_tokens, args.sequential_episodes)
    res["multi_over_single"] = res["multi_tokens_per_s"] / res["single_tokens_per_s"]
    res["multi_over_sequential"] = res["multi_tokens_per_s"] / res["sequential_tokens_per_s"]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
