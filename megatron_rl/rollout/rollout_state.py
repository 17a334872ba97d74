"""A step's ``Rollouts`` as plain JSON and back, bit for bit: the rollouts in flight under
separate placement (generated, not yet trained on) are part of a checkpoint's
``trainer_state.json``, so a resume trains on exactly them. JSON, not pickle: loading a checkpoint
never runs code from it.

Float values survive exactly (a Python float's ``repr`` round-trips, and a float32 widened to a
float is narrowed back without loss). Prompt rows' ``label`` and ``metadata`` are stored as given
when JSON can hold them, else as their ``repr``: the rewards are already in the rollouts, so the
rows only feed the logged samples.

Expert routes (R3: int16 ``[n, L, K]`` per response) are too large for JSON: the state names each
sample's routes by a key, and the arrays go into a dict the caller stores beside it
(``save_routes`` / ``load_routes``: one uncompressed ``.npz``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from megatron_rl.data.prompts import PromptRow
from megatron_rl.rollout.collect import Rollouts
from megatron_rl.rollout.engine import Sample


def _sample_state(s: Sample, key: str, routes: Optional[Dict[str, np.ndarray]]) -> Dict[str, Any]:
    d = dataclasses.asdict(s)
    d.pop("routed_experts")
    d.pop("route_key")
    if s.routed_experts is not None:
        if routes is None:
            raise ValueError("rollout_state: the samples carry expert routes; pass a dict for them")
        routes[key] = np.asarray(s.routed_experts)
        d["routes"] = key
    return d


def rollouts_state(r: Rollouts, routes: Optional[Dict[str, np.ndarray]] = None,
                   prefix: str = "") -> Dict[str, Any]:
    """``r`` as JSON-ready values; the samples' expert routes go into ``routes`` under keys
    ``{prefix}{group}_{sample}``."""
    out = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)
           if f.name not in ("rows", "samples", "rewards")}
    out["rows"] = [dataclasses.asdict(row) for row in r.rows]
    out["samples"] = [[_sample_state(s, f"{prefix}{g}_{i}", routes) for i, s in enumerate(group)]
                      for g, group in enumerate(r.samples)]
    out["rewards"] = [{"dtype": str(t.dtype).replace("torch.", ""), "values": t.tolist()}
                      for t in r.rewards]
    return out


def _sample(d: Dict[str, Any], routes: Optional[Dict[str, np.ndarray]]) -> Sample:
    d = dict(d)
    key = d.pop("routes", None)
    if key is None:
        return Sample(**d)
    if routes is None or key not in routes:
        raise ValueError(f"rollout_state: the expert routes {key!r} are missing from the "
                         "checkpoint's in-flight routes")
    return Sample(**d, routed_experts=routes[key])


def rollouts_from_state(d: Dict[str, Any],
                        routes: Optional[Dict[str, np.ndarray]] = None) -> Rollouts:
    """What ``rollouts_state`` wrote (``routes``: the dict it filled)."""
    d = dict(d)
    rows = [PromptRow(**row) for row in d.pop("rows")]
    samples = [[_sample(s, routes) for s in g] for g in d.pop("samples")]
    rewards = [torch.tensor(t["values"], dtype=getattr(torch, t["dtype"])) for t in d.pop("rewards")]
    return Rollouts(rows=rows, samples=samples, rewards=rewards, **d)


IN_FLIGHT_ROUTES = "in_flight_routes.npz"   # beside a checkpoint's trainer_state.json


def save_routes(path: Path, routes: Dict[str, np.ndarray]) -> None:
    """``routes`` into ``path`` (``.npz``, uncompressed: they are small integers read once)."""
    with open(path, "wb") as f:
        np.savez(f, **routes)


def load_routes(path: Path) -> Dict[str, np.ndarray]:
    """What ``save_routes`` wrote (no pickle: arrays only)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for what a data file may put in a row (numpy values)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return repr(value)
