"""Token-budget micro-batches against fixed counts on ragged responses, at DP 2 on CPU.

    python bench/dynamic_batch.py                       # 8 groups of 4, responses 64-4096 tokens
    python bench/dynamic_batch.py --groups 4 --max-len 1024

One RL step of the tiny MoE (hidden 64, 2 layers, 4 experts top-2, vocab 256, fp32; GSPO, one
update, old log-probs from the update's forward) through the trainer's own batch path
(``rollout_batch.step_batch`` -> ``rl_batch.run_updates``), in two gloo processes of one thread
each. The step's rollouts: ``--groups`` prompts of 128 tokens, ``--group-size`` responses each,
lengths drawn uniformly from ``[--min-len, --max-len]`` (seeded). Every mode sees the same
rollouts and the same weights:

* ``fixed bshd``: ``micro_batch_size`` = one group, padded to its longest (the baseline);
* ``fixed thd``: the same micro-batches packed;
* ``budget thd``: ``max_tokens_per_micro_batch`` = the fixed BSHD path's largest micro-batch as
  laid out, so both have the same memory ceiling; groups balanced over DP by tokens.

Printed per mode: padding share, the busiest DP rank's tokens over the mean (minus 1), micro-
batches per rank, the slowest rank's step seconds (mean of ``--repeats`` after a warm-up) and
peak memory added per rank (``VmHWM``, as ``bench/cp_step.py``), with ratios to the baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_rl.parallel.launch import free_port  # noqa: E402
from peak_rss import reset_high_water, rss_kb  # noqa: E402  (bench/, the script's directory)

PROMPT = 128


def _rollouts(vocab: int, a):
    from megatron_rl.data.prompts import PromptRow
    from megatron_rl.rollout.collect import Rollouts
    from megatron_rl.rollout.engine import Sample

    g = torch.Generator().manual_seed(a.seed)
    out = Rollouts()
    for p in range(a.groups):
        prompt = torch.randint(0, vocab, (PROMPT,), generator=g).tolist()
        group = []
        for _ in range(a.group_size):
            n = int(torch.randint(a.min_len, a.max_len + 1, (1,), generator=g))
            group.append(Sample(p, prompt, torch.randint(0, vocab, (n,), generator=g).tolist(),
                                (-3.0 - torch.rand(n, generator=g)).tolist(), "stop"))
        out.rows.append(PromptRow(p, f"p{p}"))
        out.samples.append(group)
        out.rewards.append(torch.rand(a.group_size, generator=g))
    return out


def _budget(rollouts) -> int:
    """The fixed BSHD path's largest micro-batch (one group) as laid out."""
    from megatron_rl.parallel.cp_layout import padded_length

    return max(len(g) * padded_length(max(len(s.prompt_ids) + len(s.token_ids) for s in g), 1)
               for g in rollouts.samples)


def _worker(rank, world, port, a, mode, out):
    """One mode in fresh processes (memory high-water marks do not carry over between modes)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from megatron_rl.model.build import ModelOptions
    from megatron_rl.model.hf_config import load_hf_config
    from megatron_rl.model.tiny import tiny_hf_config
    from megatron_rl.parallel.config import Layout
    from megatron_rl.runtime.model_setup import build_model
    from megatron_rl.runtime.parallel_init import init_megatron_parallel
    from megatron_rl.train.optimizer import OptimSettings, build_optimizer
    from megatron_rl.train.rl_batch import StepPlan, logprob_passes, run_updates
    from megatron_rl.train.rollout_batch import BatchShape, step_batch

    hf = load_hf_config(tiny_hf_config("qwen3_moe"))
    groups = init_megatron_parallel(Layout(), seed=0)
    model, _ = build_model(hf, Layout(), ModelOptions(), distributed_optimizer=True)
    opt, sched = build_optimizer(model, OptimSettings(lr=1e-6), torch.float32)
    rollouts = _rollouts(hf.vocab_size, a)
    plan = StepPlan("grpo", {}, "gspo", {"eps_low": 0.2, "eps_high": 0.2})
    packed, budgeted = MODES[mode]
    shape = BatchShape(dp=groups.dp_size, dp_rank=groups.dp_rank, groups_per_micro_batch=1,
                       cp_size=1, cp_rank=0, packed=packed, advantage="grpo",
                       max_tokens=_budget(rollouts) if budgeted else 0)

    def step():
        batch = step_batch(rollouts, shape, groups, torch.device("cpu"))
        logprob_passes(model, batch, groups, plan)
        run_updates(model, opt, sched, batch, groups, plan)
        return batch

    batch = step()                                               # warm-up
    before = reset_high_water()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(a.repeats):
        step()
    dist.barrier()
    seconds = (time.perf_counter() - t0) / a.repeats
    peaks = [None] * world
    dist.all_gather_object(peaks, (rss_kb("VmHWM") - before) / 1024)
    if rank == 0:
        out.append((batch.plan_metrics, seconds, max(peaks), shape.max_tokens))
    dist.destroy_process_group()


MODES = {"fixed bshd": (False, False), "fixed thd": (True, False), "budget thd": (True, True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for mode in MODES:
        with mp.Manager() as m:
            out = m.list()
            mp.spawn(_worker, args=(2, free_port(), a, mode, out), nprocs=2, join=True)
            rows.append((mode, *out[0]))
    budget = rows[-1][-1]
    print(f"cpus={os.cpu_count()} torch={torch.__version__} DP=2 groups={a.groups}x"
          f"{a.group_size} prompt={PROMPT} responses {a.min_len}-{a.max_len} "
          f"budget={budget} tokens")
    print(f"{'mode':11s} {'pad %':>6s} {'DP imbal %':>10s} {'mb/rank':>7s} {'s/step':>8s} "
          f"{'MiB/rank':>8s} {'time / base':>11s} {'mem / base':>10s}")
    base = rows[0]
    for name, m, seconds, mem, _ in rows:
        print(f"{name:11s} {100 * m['batch/pad_frac']:6.1f} "
              f"{100 * m['batch/dp_token_imbalance']:10.1f} {m['batch/micro_batches']:7.0f} "
              f"{seconds:8.2f} {mem:8.1f} {seconds / base[2]:11.2f} {mem / base[3]:10.2f}")


if __name__ == "__main__":
    main()
