"""What a resume may change: the settings that shape training are the checkpoint's; a rerun in
the same ``train.output_dir`` with other values would silently mix two runs (or, with a finished
run, train nothing while ``config.yaml`` claimed the new settings).

``SAFE`` keys only say how long to run, how often to log and save, where and how to run (the
parallel layout is checked against the checkpoint separately), or where a fresh run would start
from (ignored by a resume). Everything else must match unless ``train.resume=force``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

SAFE = (
    "train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.export_hf", "train.resume", "train.resume_fallback", "train.loggers",
    "train.preempt_grace_s", "train.max_bad_steps", "train.output_dir", "train.samples_every",
    "train.samples_per_step", "train.val_every", "train.val_n", "train.val_temperature",
    "train.val_prompts", "data.val_path", "train.tracker_project",
    "train.optimizer_checkpoint", "train.logprob_max_tokens_per_micro_batch",
    "parallel.",
    "rollout.model_dir", "rollout.tensor_parallel_size", "rollout.enforce_eager",
    "rollout.gpu_memory_utilization", "rollout.cpu_kv_cache_gb", "rollout.sleep_mode",
    "rollout.sync_bucket_mb", "rollout.probe_every", "rollout.probe_tolerance",
    "model.init_from", "model.allow_unknown_config_keys", "critic.init_from",
)


def flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"a.b.c": leaf}`` of nested dicts; lists stay leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: Dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE)


def training_changes(saved: Dict[str, Any], now: Dict[str, Any],
                     defaults: Optional[Dict[str, Any]] = None) -> List[str]:
    """``"key: old -> new"`` for every setting that shapes training and differs. With
    ``defaults`` (the config tree of a default ``RunConfig``), a checkpoint from an earlier
    version resumes across keys added since at their default (which keeps the old behaviour) and
    across retired keys it left off (false / empty); anything else is a change."""
    a, b = flatten(saved), flatten(now)
    d = flatten(defaults) if defaults is not None else {}
    out = []
    for key in sorted(set(a) | set(b)):
        if _safe(key):
            continue
        old, new = a.get(key, "<unset>"), b.get(key, "<unset>")
        if key not in a and key in d and new == d[key]:
            continue
        if key not in b and defaults is not None and key not in d and not old:
            continue
        if old != new:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out
