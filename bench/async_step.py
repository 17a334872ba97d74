"""One step off against synchronous: how much of a step the trainer and the engine sit idle.

    python bench/async_step.py                    # 30 steps per mode, responses of 48 tokens
    python bench/async_step.py --steps 60 --response 96

Three runs of the main job's model (the tiny MoE, GSPO) on the same machine, each in its own
torchrun job with one thread per process:
- ``colocated``: one process generates, then trains (today's default; the baseline);
- ``separate k=0``: one engine rank and one trainer rank, synchronous (each waits for the other);
- ``separate k=1``: the same two ranks, the engine generating step t+1 while step t trains.
Responses run to a fixed length (``rollout.ignore_eos``) so that generation and the update take
similar time. Per mode: the mean step time (steps after ``--skip``), the trainer's idle share
(``async/trainer_wait_s`` / step) and the engine's (``async/engine_wait_s`` / step), and each
mode's speed against colocated, measured in this run.

What transfers to GPUs: the overlap structure. The projection line takes the colocated run's
phases, generation ``G`` (``time/rollout_s``) and the rest ``U`` (log-probs, update, sync), and
gives a synchronous step ``G + U`` against a one-step-off step ``max(G, U)`` on separate devices.
What does not: on this machine both ranks share the same cores and memory bandwidth, so the
measured k=1 step is slower than ``max(G, U)``; and on GPUs the phases' ratio is the model's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "recipes" / "tiny_moe_gspo.yaml"


def _run(out: Path, steps: int, response: int, world: int, extra) -> list:
    args = ["-m", "megatron_rl", "train", "--config", str(RECIPE), f"train.output_dir={out}",
            f"train.steps={steps}", "train.checkpoint_every=0", "train.export_hf=false",
            "train.loggers=[]", "rollout.probe_every=0", "rollout.ignore_eos=true",
            f"rollout.max_response_len={response}", "--quiet", *extra]
    cmd = [sys.executable, *args] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        f"--nproc-per-node={world}", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        sys.exit(f"{' '.join(extra) or 'colocated'}: exit {r.returncode}\n{r.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _mean(rows, key: str, skip: int) -> float:
    vals = [r.get(key, 0.0) for r in rows[skip:]]
    return statistics.fmean(vals) if vals else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out")
    ap.add_argument("--response", type=int, default=48, help="tokens per response")
    a = ap.parse_args()
    sep = ["rollout.placement=separate", "rollout.engine_ranks=1"]
    modes = [("colocated", 1, []), ("separate k=0", 2, sep),
             ("separate k=1", 2, [*sep, "rollout.max_staleness=1", "algo.mismatch.tis_cap=2.0"])]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{a.steps} steps, responses of {a.response} tokens, mean over steps {a.skip + 1}-{a.steps}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, world, extra in modes:
            rows = _run(Path(tmp) / name.replace(" ", "_").replace("=", ""), a.steps, a.response,
                        world, extra)
            step = _mean(rows, "time/step_s", a.skip)
            results[name] = rows
            base = _mean(results["colocated"], "time/step_s", a.skip)
            print(f"{name:>13}: {step:6.3f} s/step ({base / step:4.2f}x colocated); trainer idle "
                  f"{_mean(rows, 'async/trainer_wait_s', a.skip) / step:5.1%}, engine idle "
                  f"{_mean(rows, 'async/engine_wait_s', a.skip) / step:5.1%}")
    col = results["colocated"]
    g = _mean(col, "time/rollout_s", a.skip)
    u = sum(_mean(col, f"time/{k}_s", a.skip) for k in ("logprob", "train", "sync"))
    print(f"projection from colocated phases (generation {g:.3f} s, rest {u:.3f} s): one step off "
          f"on separate devices {g + u:.3f} -> {max(g, u):.3f} s/step ({(g + u) / max(g, u):.2f}x)")


if __name__ == "__main__":
    main()
