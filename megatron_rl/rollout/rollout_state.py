"""A step's ``Rollouts`` as plain JSON and back, bit for bit: the rollouts in flight under
separate placement (generated, not yet trained on) are part of a checkpoint's
``trainer_state.json``, so a resume trains on exactly them. JSON, not pickle: loading a checkpoint
never runs code from it.

Float values survive exactly (a Python float's ``repr`` round-trips, and a float32 widened to a
float is narrowed back without loss). Prompt rows' ``label`` and ``metadata`` are stored as given
when JSON can hold them, else as their ``repr``: the rewards are already in the rollouts, so the
rows only feed the logged samples.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import torch

from megatron_rl.data.prompts import PromptRow
from megatron_rl.rollout.collect import Rollouts
from megatron_rl.rollout.engine import Sample


def _sample_state(s: Sample) -> Dict[str, Any]:
    if s.routed_experts is not None:
        raise ValueError("rollout_state: expert routes are not kept in checkpoints "
                         "(separate placement refuses train.routing_replay=rollout)")
    d = dataclasses.asdict(s)
    d.pop("routed_experts")
    d.pop("route_key")
    return d


def rollouts_state(r: Rollouts) -> Dict[str, Any]:
    """``r`` as JSON-ready values."""
    out = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)
           if f.name not in ("rows", "samples", "rewards")}
    out["rows"] = [dataclasses.asdict(row) for row in r.rows]
    out["samples"] = [[_sample_state(s) for s in g] for g in r.samples]
    out["rewards"] = [{"dtype": str(t.dtype).replace("torch.", ""), "values": t.tolist()}
                      for t in r.rewards]
    return out


def rollouts_from_state(d: Dict[str, Any]) -> Rollouts:
    """What ``rollouts_state`` wrote."""
    d = dict(d)
    rows = [PromptRow(**row) for row in d.pop("rows")]
    samples = [[Sample(**s) for s in g] for g in d.pop("samples")]
    rewards = [torch.tensor(t["values"], dtype=getattr(torch, t["dtype"])) for t in d.pop("rewards")]
    return Rollouts(rows=rows, samples=samples, rewards=rewards, **d)


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for what a data file may put in a row (numpy values)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return repr(value)
