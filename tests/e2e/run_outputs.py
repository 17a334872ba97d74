"""What the e2e tests compare between two runs of the trainer: their metrics without the wall-clock
and memory readings, and their exported weights."""

from __future__ import annotations

import json

VOLATILE = ("time/", "perf/", "sync/seconds", "mem/")   # wall-clock and memory measurements


def _volatile(key: str) -> bool:
    return key.startswith(VOLATILE) or (key.startswith("async/") and key.endswith("_s"))


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not _volatile(k)} for r in rows]


def weights(out, export: str = "hf"):
    """The tensors of ``<out>/<export>`` (``hf``: the policy; ``hf_critic``: PPO's critic)."""
    from safetensors.torch import load_file

    return {k: v for f in sorted((out / export).glob("*.safetensors")) for k, v in load_file(f).items()}
