"""What a person sees of a run (rank 0 only): ``metrics.jsonl``, TensorBoard scalars, a console
line per step with ETA, the resolved config and git SHA, and a PNG of the reward curve.

Everything lands in the run directory; a resumed run appends (the step numbers continue), after
dropping the rows of the steps it redoes.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from megatron_rl.io_errors import reported_writes

CONSOLE = (("reward/mean", "reward {:.3f}"), ("train/kl", "kl {:.4f}"),
           ("train/entropy", "ent {:.3f}"), ("response/length_mean", "len {:.1f}"),
           ("mismatch/mean", "mismatch {:.1e}"), ("perf/tokens_per_s", "{:.0f} tok/s"))


def git_sha() -> str:
    """The package checkout's commit (``unknown`` outside a git checkout)."""
    here = pathlib.Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip() if out.returncode == 0 else "unknown"
    return sha + ("-dirty" if dirty and sha != "unknown" else "")


def eta_seconds(step: int, first_step: int, total: int, first_done: float,
                now: float) -> Optional[float]:
    """Time left, from the steps after the first one logged; None until one of them is done: the
    first carries the warm-up (engine start, compilation; 10x a step on the CPU demo), so its own
    duration would be a wrong guess, not a rough one."""
    if step <= first_step:
        return None
    return (now - first_done) / (step - first_step) * (total - step)


class RunLog:
    """A run's logs on rank 0: metrics.jsonl, TensorBoard and trackers, samples, and the console
    line."""
    def __init__(self, run_dir: pathlib.Path, total_steps: int, *, config_yaml: str,
                 tensorboard: bool = True, quiet: bool = False, start_step: int = 0,
                 trackers: Optional[List[Any]] = None):
        self.dir = pathlib.Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        _rewind(self.dir / "metrics.jsonl", start_step)
        _rewind(self.dir / "samples.jsonl", start_step)
        (self.dir / "config.yaml").write_text(config_yaml)
        (self.dir / "run_info.json").write_text(json.dumps(
            {"git_sha": git_sha(), "argv": sys.argv, "python": sys.version.split()[0],
             "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
        self.total = total_steps
        self.quiet = quiet
        self.start = time.perf_counter()
        self.first_step: Optional[int] = None
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run redoes the steps after its checkpoint (a fresh one, all): TensorBoard
            # drops the events an interrupted run wrote from there on, so each step has one point
            self.writer = SummaryWriter(str(self.dir / "tensorboard"), purge_step=start_step + 1)
        self.jsonl = open(self.dir / "metrics.jsonl", "a")
        self.trackers = list(trackers or [])   # trackers.py: wandb, MLflow

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        """Write step ``step``'s metrics everywhere and print its console line."""
        row = {"step": step, **{k: float(v) for k, v in sorted(metrics.items())}}
        after = "the checkpoints are as they were; free space and rerun the same command to resume"
        with reported_writes("metrics", self.dir / "metrics.jsonl", after):
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()
        if self.writer is not None:
            # TensorBoard writes in a thread and raises its failure at a later call
            with reported_writes("TensorBoard events", self.dir / "tensorboard", after):
                for k, v in metrics.items():
                    self.writer.add_scalar(k, v, step)
                self.writer.flush()
        for t in self.trackers:
            t.log(step, metrics)
        if self.first_step is None:
            self.first_step, self.first_done = step, time.perf_counter()
        if not self.quiet:
            print(self._line(step, metrics), file=sys.stderr, flush=True)

    def _line(self, step: int, m: Dict[str, float]) -> str:
        eta = eta_seconds(step, self.first_step, self.total, self.first_done, time.perf_counter())
        parts = [f"step {step:>4}/{self.total}"]
        parts += [fmt.format(m[k]) for k, fmt in CONSOLE if k in m]
        parts.append(f"{m.get('time/step_s', 0.0):.1f} s/step")
        if eta is not None:
            parts.append(f"ETA {_clock(eta)}")
        return " | ".join(parts)

    def samples(self, step: int, rows: List[Dict[str, Any]]) -> None:
        """What the policy writes: ``rows`` (prompt, response, reward, ...) appended to
        ``samples.jsonl`` and shown in TensorBoard's text tab."""
        after = "the checkpoints are as they were; free space and rerun the same command to resume"
        with reported_writes("samples", self.dir / "samples.jsonl", after):
            with open(self.dir / "samples.jsonl", "a") as f:
                for r in rows:
                    f.write(json.dumps({"step": step, **r}) + "\n")
        if self.writer is not None:
            text = "\n\n".join(f"**reward {r['reward']:.3f}**  \nprompt: `{r['prompt']}`  \n"
                                 f"response: `{r['response']}`" for r in rows)
            self.writer.add_text("samples", text, step)
        for t in self.trackers:
            t.text(step, rows)

    def note(self, text: str) -> None:
        """Warnings, stops and the end of the run: printed even with ``--quiet``, which silences
        the per-step lines only."""
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Best effort: a run ending on a failed write has already said so."""
        for f in (self.jsonl, self.writer, *self.trackers):
            try:
                if f is not None:
                    f.close()
            except Exception:  # noqa: BLE001 -- the error that ended the run is the one to show
                pass


def _clock(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def read_metrics(path: pathlib.Path) -> List[Dict[str, float]]:
    """The logged rows; a line cut short by a crash (only ever the last) is left out."""
    rows = []
    for line in pathlib.Path(path).read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _rewind(path: pathlib.Path, step: int) -> None:
    """A run resumed from the checkpoint of ``step`` redoes the steps after it: drop their rows
    (logged before the process died) so that each step appears once, as last computed."""
    if not path.is_file():
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


def plot_curve(rows: List[Dict[str, float]], out: pathlib.Path, key: str = "reward/mean",
               title: str = "mean reward per step") -> Optional[pathlib.Path]:
    """A PNG line chart of ``key`` over steps (Pillow; a few primitives need no plotting library).
    Returns the path, or None when there is nothing to draw."""
    from PIL import Image, ImageDraw

    pts = [(r["step"], r[key]) for r in rows if key in r]
    if len(pts) < 2:
        return None
    W, H, L, R, T, B = 800, 450, 70, 20, 40, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(ys)), max(ys) if max(ys) > min(0.0, min(ys)) else 1.0
    sx = lambda x: L + (x - x0) / max(x1 - x0, 1e-9) * (W - L - R)  # noqa: E731
    sy = lambda y: H - B - (y - y0) / max(y1 - y0, 1e-9) * (H - T - B)  # noqa: E731
    d.rectangle([L, T, W - R, H - B], outline="black")
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        d.line([L - 4, sy(y), W - R, sy(y)], fill=(225, 225, 225))
        d.text((5, sy(y) - 6), f"{y:.2f}", fill="black")
    for i in range(5):
        x = x0 + (x1 - x0) * i / 4
        d.text((sx(x) - 10, H - B + 8), f"{x:.0f}", fill="black")
    k = max(1, len(pts) // 20)  # a moving average makes the trend readable over sampling noise
    smooth = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
    d.line([(sx(x), sy(y)) for x, y in pts], fill=(160, 190, 230), width=1)
    d.line([(sx(x), sy(y)) for x, y in zip(xs, smooth)], fill=(20, 70, 160), width=3)
    d.text((L, 12), f"{title} ({key}; thick: moving average of {k})", fill="black")
    d.text((W // 2 - 15, H - 20), "step", fill="black")
    out = pathlib.Path(out)
    img.save(out)
    return out


def memory_metrics() -> Dict[str, float]:
    """This rank's resident host memory, reported as the maximum over ranks: the soak test's leak
    detector and the first thing to look at before an OOM kill (GPU peaks: ``PhasePeaks``)."""
    out = {}
    try:
        with open("/proc/self/statm") as f:
            out["mem/rss_mb/max"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux
        import resource

        out["mem/rss_mb/max"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


class PhasePeaks:
    """The GPU's peak allocated memory in each phase of a step (rollout, log-prob passes, updates,
    weight sync), as ``mem/gpu_peak_<phase>_gb/max``: where the policy, the critic (PPO) and the
    engine together come closest to the device's capacity. Nothing without a GPU."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.peaks: Dict[str, float] = {}

    def end(self, phase: str) -> None:
        """Record the GPU memory peak of the phase that just ended, and reset it."""
        if not self.cuda:
            return
        import torch

        self.peaks[f"mem/gpu_peak_{phase}_gb/max"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()

    def metrics(self) -> Dict[str, float]:
        """The step's phase peaks and their maximum, ``mem/gpu_peak_gb/max``."""
        out, self.peaks = self.peaks, {}
        if out:
            out["mem/gpu_peak_gb/max"] = max(out.values())
        return out


def summarise_run(run_dir: pathlib.Path) -> str:
    """The end-of-run line: the reward's first and last tenth, and where everything is (the
    reward curve drawn to ``reward_curve.png``)."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    png = plot_curve(rows, run_dir / "reward_curve.png")
    k = max(1, len(rows) // 10)
    first = sum(r["reward/mean"] for r in rows[:k]) / k
    last = sum(r["reward/mean"] for r in rows[-k:]) / k
    return (f"reward {first:.3f} -> {last:.3f} (mean of the first / last {k} logged steps); run "
            f"directory {run_dir}" + (f"; curve {png}" if png else ""))
