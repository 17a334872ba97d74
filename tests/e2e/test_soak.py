"""Load: a long CPU run with host memory sampled every step (``mem/rss_mb/max`` in the metrics).
After a warm-up the resident set must stay flat: no growth beyond ``BOUND_MB`` between the mean
of steps 51-100 and the mean of the last 50 steps. Not in CI (``-m soak``); the measured curves
(400 and 2000 steps, ``MEGATRON_RL_SOAK_STEPS``) are in docs/reliability.md and docs/soak_rss.png."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.soak, pytest.mark.vllm]

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = int(os.environ.get("MEGATRON_RL_SOAK_STEPS", "400"))
BOUND_MB = 32.0


def test_soak_host_memory_stays_flat(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "megatron_rl", "train", "--config",
                        str(ROOT / "configs" / "recipes" / "tiny_moe_gspo.yaml"), "--quiet",
                        f"train.output_dir={out}", f"train.steps={STEPS}", "train.checkpoint_every=50",
                        "rollout.probe_every=25"],
                       cwd=ROOT, capture_output=True, text=True, timeout=3600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rss = [row["mem/rss_mb/max"] for row in rows]
    assert len(rss) == STEPS
    early, late = sum(rss[50:100]) / 50, sum(rss[-50:]) / 50
    keep = os.environ.get("MEGATRON_RL_SOAK_KEEP")
    if keep:   # for the docs: the curve and the numbers
        from megatron_rl.observe import plot_curve

        plot_curve(rows, pathlib.Path(keep) / "soak_rss.png", key="mem/rss_mb/max",
                   title="host RSS (MB) per step, CPU soak")
        (pathlib.Path(keep) / "soak_rss.json").write_text(json.dumps(
            {"steps": STEPS, "first": rss[0], "early_mean": early, "late_mean": late,
             "max": max(rss), "min": min(rss), "step_s": sum(x["time/step_s"] for x in rows) / STEPS,
             "every_10": rss[::10]}))
    print(f"\nRSS MB: step 1 {rss[0]:.0f}, steps 51-100 {early:.1f}, last 50 {late:.1f}, max {max(rss):.0f}")
    assert late - early < BOUND_MB, (early, late)
