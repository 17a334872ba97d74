"""The forward-only passes over merged micro-batches (``train.logprob_max_tokens_per_micro_batch``)
against the training micro-batches, at DP 2 on CPU.

    python bench/logprob_passes.py                        # mid-size MoE, 16 groups of 4, 64-1024
    python bench/logprob_passes.py --model tiny --groups 32 --max-len 256

One step's forward-only passes (the old-policy pass recording R2's routes, then the reference
pass) through the trainer's own path (``rollout_batch.step_batch`` -> ``rl_batch.logprob_passes``)
in two gloo processes of one thread each, packed (THD) micro-batches under the training budget
``--budget``. The rollouts: ``--groups`` prompts of 128 tokens, ``--group-size`` responses each,
lengths uniform in ``[--min-len, --max-len]`` (seeded); every mode sees the same rollouts and
weights. Modes: the passes over the training micro-batches (the baseline), and over merges of
them under ``--merge`` x the budget (each given factor). Printed per mode: passes per rank, the
slowest rank's seconds for the passes (mean of ``--repeats`` after a warm-up) and the peak memory
they add per rank (``VmHWM``), with ratios to the baseline. Models: ``tiny`` (hidden 64, 2 layers,
4 experts top-2) and ``mid`` (hidden 512, 4 layers, 8 experts of 256 top-2: ``bench/vs_trl.py``'s).
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
from dynamic_batch import _rollouts  # noqa: E402  (bench/, the script's directory)
from peak_rss import reset_high_water, rss_kb  # noqa: E402
from vs_trl import MODELS  # noqa: E402


def _worker(rank, world, port, a, factor, out):
    """One mode in fresh processes (memory high-water marks do not carry over between modes)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from megatron_rl.model.build import ModelOptions
    from megatron_rl.model.hf_config import load_hf_config
    from megatron_rl.model.routing_replay import route_control
    from megatron_rl.model.tiny import tiny_hf_config
    from megatron_rl.parallel.config import Layout
    from megatron_rl.runtime.model_setup import build_model
    from megatron_rl.runtime.parallel_init import init_megatron_parallel
    from megatron_rl.train.reference import HostWeights
    from megatron_rl.train.rl_batch import StepPlan, logprob_passes
    from megatron_rl.train.rollout_batch import BatchShape, step_batch

    hf = load_hf_config(tiny_hf_config("qwen3_moe", **MODELS[a.model]))
    groups = init_megatron_parallel(Layout(), seed=0)
    model, _ = build_model(hf, Layout(), ModelOptions(), distributed_optimizer=False)
    reference = HostWeights(model)
    rollouts = _rollouts(hf.vocab_size, a)
    plan = StepPlan("grpo", {}, "gspo", {"eps_low": 0.2, "eps_high": 0.2, "kl_coef": 0.01},
                    routing_replay="old", separate_old_pass=True, needs_reference=True,
                    packed=True)
    shape = BatchShape(dp=groups.dp_size, dp_rank=groups.dp_rank, groups_per_micro_batch=1,
                       cp_size=1, cp_rank=0, packed=True, advantage="grpo", max_tokens=a.budget,
                       route_layers=route_control(model[0]).layers,
                       logprob_max_tokens=factor * a.budget if factor > 1 else 0)

    def passes():
        batch = step_batch(rollouts, shape, groups, torch.device("cpu"))
        dist.barrier()
        t0 = time.perf_counter()
        logprob_passes(model, batch, groups, plan, reference)
        return batch, time.perf_counter() - t0

    batch, _ = passes()                                          # warm-up
    before = reset_high_water()
    seconds = sum(passes()[1] for _ in range(a.repeats)) / a.repeats
    stats = [None] * world
    dist.all_gather_object(stats, (seconds, (rss_kb("VmHWM") - before) / 1024))
    if rank == 0:
        m = batch.plan_metrics
        out.append((m["batch/micro_batches"], m.get("batch/logprob_micro_batches",
                                                    m["batch/micro_batches"]),
                    max(s for s, _ in stats), max(mem for _, mem in stats)))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="mid")
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--budget", type=int, default=4096, help="training tokens per micro-batch")
    p.add_argument("--merge", type=int, nargs="+", default=[2, 4],
                   help="log-prob budgets, as multiples of --budget")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for factor in [1] + a.merge:
        with mp.Manager() as m:
            out = m.list()
            mp.spawn(_worker, args=(2, free_port(), a, factor, out), nprocs=2, join=True)
            rows.append((factor, *out[0]))
    print(f"cpus={os.cpu_count()} torch={torch.__version__} model={a.model} DP=2 "
          f"groups={a.groups}x{a.group_size} prompt=128 responses {a.min_len}-{a.max_len} "
          f"training budget={a.budget} tokens; passes: old (recording R2 routes) + reference")
    print(f"{'log-prob budget':>15s} {'mb/rank':>7s} {'passes/rank':>11s} {'s/passes':>9s} "
          f"{'MiB/rank':>8s} {'time / base':>11s} {'mem / base':>10s}")
    base = rows[0]
    for factor, mbs, passes, seconds, mem in rows:
        label = "training's" if factor == 1 else f"{factor}x = {factor * a.budget}"
        print(f"{label:>15s} {mbs:7.0f} {passes:11.0f} {seconds:9.2f} {mem:8.1f} "
              f"{seconds / base[3]:11.2f} {mem / max(base[4], 1e-9):10.2f}")


if __name__ == "__main__":
    main()
