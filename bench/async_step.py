"""One step off against synchronous: how much of a step the trainer and the engine sit idle.

    python bench/async_step.py                    # 30 steps per mode, responses of 48 tokens
    python bench/async_step.py --steps 60 --response 96
    python bench/async_step.py --response 12 --epochs 2   # an update as long as the generation
    python bench/async_step.py --curve 200 --png docs/async_reward_curve.png

``--curve N``: the main job itself (its own response length) for N steps, synchronous (colocated)
and one step off (separate, k=1), their mean rewards over windows of 20 steps and both curves in
one PNG: does one step off learn the task as well?

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


def _run(out: Path, steps: int, response: int, world: int, extra, epochs: int = 1) -> list:
    fixed = ["rollout.ignore_eos=true", f"rollout.max_response_len={response}"] if response else []
    fixed.append(f"train.epochs_per_step={epochs}")
    args = ["-m", "megatron_rl", "train", "--config", str(RECIPE), f"train.output_dir={out}",
            f"train.steps={steps}", "train.checkpoint_every=0", "train.export_hf=false",
            "train.loggers=[]", "rollout.probe_every=0", *fixed, "--quiet", *extra]
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


SEP = ["rollout.placement=separate", "rollout.engine_ranks=1"]
ONE_OFF = [*SEP, "rollout.max_staleness=1", "algo.mismatch.tis_cap=2.0"]


def _draw(curves: dict, png: Path) -> None:
    """Both reward curves (moving averages of 10 steps) in one PNG, with Pillow."""
    from PIL import Image, ImageDraw

    W, H, L, B, T = 800, 450, 60, 40, 30
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    steps = max(len(c) for c in curves.values())
    top = max(max(c) for c in curves.values()) or 1.0
    sx = lambda i: L + i / max(steps - 1, 1) * (W - L - 20)  # noqa: E731
    sy = lambda y: H - B - y / top * (H - T - B)  # noqa: E731
    d.rectangle([L, T, W - 20, H - B], outline="black")
    for i in range(5):
        d.text((5, sy(top * i / 4) - 6), f"{top * i / 4:.2f}", fill="black")
        d.text((sx((steps - 1) * i / 4) - 10, H - B + 8), f"{1 + (steps - 1) * i / 4:.0f}", fill="black")
    for (name, ys), colour, row in zip(curves.items(), [(20, 70, 160), (200, 60, 30)], (0, 1)):
        smooth = [sum(ys[max(0, i - 9):i + 1]) / len(ys[max(0, i - 9):i + 1]) for i in range(len(ys))]
        d.line([(sx(i), sy(y)) for i, y in enumerate(smooth)], fill=colour, width=3)
        d.text((L + 10, T + 8 + 14 * row), f"{name} (moving average of 10)", fill=colour)
    d.text((W // 2 - 60, 8), "mean reward per step", fill="black")
    img.save(png)


def curve(steps: int, png: Path) -> None:
    """The main job synchronous and one step off: reward over windows of 20 steps, and the PNG."""
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, world, extra in [("synchronous (colocated)", 1, []),
                                   ("one step off (separate, k=1)", 2, ONE_OFF)]:
            rows = _run(Path(tmp) / str(world), steps, 0, world, extra)
            curves[name] = [r["reward/mean"] for r in rows]
    for name, ys in curves.items():
        windows = [statistics.fmean(ys[i:i + 20]) for i in range(0, len(ys), 20)]
        print(f"{name:>29}: " + " ".join(f"{w:.3f}" for w in windows))
    _draw(curves, png)
    print(f"curve: {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out")
    ap.add_argument("--response", type=int, default=48, help="tokens per response")
    ap.add_argument("--epochs", type=int, default=1,
                    help="train.epochs_per_step: passes over the rollouts (lengthens the update)")
    ap.add_argument("--curve", type=int, default=0, help="the reward-curve comparison instead")
    ap.add_argument("--png", type=Path, default=Path("async_reward_curve.png"))
    a = ap.parse_args()
    if a.curve:
        return curve(a.curve, a.png)
    modes = [("colocated", 1, []), ("separate k=0", 2, SEP), ("separate k=1", 2, ONE_OFF)]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{a.steps} steps, responses of {a.response} tokens, {a.epochs} epoch(s) per step, mean "
          f"over steps {a.skip + 1}-{a.steps}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, world, extra in modes:
            rows = _run(Path(tmp) / name.replace(" ", "_").replace("=", ""), a.steps, a.response,
                        world, extra, a.epochs)
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
