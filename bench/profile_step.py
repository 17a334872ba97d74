"""Where an RL step of the main job goes: time per phase of the tiny-MoE GSPO demo on CPU.

    python bench/profile_step.py                 # steps 11-60 of tiny_moe_gspo, world 1
    python bench/profile_step.py --steps 100 --skip 20

Each configuration runs the real trainer in a fresh process (vLLM's CPU build, megatron-core,
one thread) with the step's phases wrapped by timers: generation, rewards, batch building, the
log-prob passes (old policy, reference, critic), the updates, the weight sync, and the rest
(metrics, logging, Python glue). The baseline is the step as it was before issue 23, in the same
invocation: megatron-core's CPU function modes (model/cpu_patches.py) active everywhere (no
``cpu_modes_suspended``) and a separate old-policy log-prob pass (``StepPlan.separate_old_pass``).
The ratio column is ours over it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

PHASES = ("generate", "rewards", "batch", "logprob", "update", "sync")
LABELS = {"generate": "vLLM generate", "rewards": "rewards", "batch": "batch building",
          "logprob": "log-prob passes", "update": "updates (fwd/bwd, optimizer)",
          "sync": "weight sync", "other": "other (metrics, logging, glue)"}


def keep_cpu_modes_everywhere() -> None:
    """The baseline's function modes: on in every phase. Call before importing the trainer's
    modules (they bind ``cpu_modes_suspended`` at import)."""
    import contextlib

    from megatron_rl.model import cpu_modes

    cpu_modes.cpu_modes_suspended = contextlib.contextmanager(lambda: (yield))


def run_separate_old_pass(trainer) -> None:
    """The baseline's old log-probs: a forward pass of their own before the update."""
    import dataclasses

    trainer.plan = dataclasses.replace(trainer.plan, separate_old_pass=True)


def run_each_step(trainer, around) -> None:
    """Trains to the last step with ``around(step)`` in place of each ``step()``, then closes."""
    step = trainer.train_step
    trainer.train_step = lambda: around(step)
    try:
        trainer.run()
    finally:
        trainer.close()


def _child(a) -> None:
    if a.baseline:
        keep_cpu_modes_everywhere()
    import megatron_rl.rollout.collect as collect
    import megatron_rl.rollout.weight_sync as weight_sync
    import megatron_rl.train.rl_batch as rl_batch
    from megatron_rl.config import load_config
    from megatron_rl.trainer import Trainer

    spent = {p: 0.0 for p in PHASES}
    steps = []

    def timed(phase, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[phase] += time.perf_counter() - t
        return run

    rl_batch.group_sequences = timed("batch", rl_batch.group_sequences)
    rl_batch.build_step_batch = timed("batch", rl_batch.build_step_batch)
    rl_batch.logprob_passes = timed("logprob", rl_batch.logprob_passes)
    rl_batch.run_updates = timed("update", rl_batch.run_updates)
    weight_sync.sync_weights = timed("sync", weight_sync.sync_weights)
    collect.score_groups = timed("rewards", collect.score_groups)
    cfg = load_config("tiny_moe_gspo", [f"train.output_dir={a.out}", f"train.steps={a.steps}",
                                        "train.loggers=[]", "train.export_hf=false",
                                        "train.checkpoint_every=0", "train.samples_every=0"])
    trainer = Trainer(cfg, quiet=True)
    if a.baseline:
        run_separate_old_pass(trainer)
    trainer.engine.generate = timed("generate", trainer.engine.generate)

    def timed_step(step):
        before = dict(spent)
        w, c = time.perf_counter(), time.process_time()
        out = step()
        steps.append({"wall": time.perf_counter() - w, "cpu": time.process_time() - c,
                      **{p: spent[p] - before[p] for p in PHASES}})
        return out

    run_each_step(trainer, timed_step)
    with open(a.result, "w") as f:
        json.dump(steps, f)


def _run(a, baseline: bool) -> dict:
    with tempfile.TemporaryDirectory() as d:
        result = os.path.join(d, "steps.json")
        cmd = [sys.executable, __file__, "--child", "--steps", str(a.steps), "--out",
               os.path.join(d, "run"), "--result", result] + (["--baseline"] if baseline else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        with open(result) as f:
            steps = json.load(f)[a.skip:]
    n = len(steps)
    mean = {k: sum(s[k] for s in steps) / n for k in ("wall", "cpu", *PHASES)}
    mean["other"] = mean["wall"] - sum(mean[p] for p in PHASES)
    return mean


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the means")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return _child(a)
    base, ours = _run(a, baseline=True), _run(a, baseline=False)
    print(f"tiny_moe_gspo, steps {a.skip + 1}-{a.steps}, world 1, one thread, cpus={os.cpu_count()}")
    print(f"{'phase':32s} {'ms/step':>8s} {'share':>6s}   {'baseline ms':>11s} {'share':>6s}   "
          f"{'ours / baseline':>15s}")
    for k in (*PHASES, "other", "wall", "cpu"):
        label = {"wall": "step (wall)", "cpu": "step (CPU, all threads)"}.get(k, LABELS.get(k, k))
        print(f"{label:32s} {ours[k] * 1e3:8.1f} {ours[k] / ours['wall']:6.1%}   "
              f"{base[k] * 1e3:11.1f} {base[k] / base['wall']:6.1%}   {ours[k] / base[k]:15.2f}")


if __name__ == "__main__":
    main()
