"""Step metrics from every rank to host floats: one gather of the names, two reductions.

Ranks may hold different metric names (only the last pipeline stage computes the loss), so the
union of names is agreed first. ``*/max`` metrics reduce with MAX, the rest with SUM: the caller
passes each rank's share (a partial sum of a global mean, already divided by how many ranks hold
the same copy). No autograd: these are logged values (backward convention: none).
"""

from __future__ import annotations

from typing import Dict, Union

import torch
import torch.distributed as dist

from megatron_rl.parallel.weight_comm import all_gather_objects

Number = Union[float, torch.Tensor]


def reduce_step_metrics(local: Dict[str, Number]) -> Dict[str, float]:
    """Host floats of ``local`` summed (``*/max``: maximised) over the world, once per step: the
    values are stacked where they live and copied to the host once."""
    names = sorted(set().union(*[set(n) for n in all_gather_objects(sorted(local))]))
    device = torch.device("cpu")
    if dist.is_initialized() and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    out: Dict[str, float] = {}
    world = dist.is_initialized() and dist.get_world_size() > 1
    for kind in ("sum", "max"):
        keys = [n for n in names if n.endswith("/max") == (kind == "max")]
        if not keys:
            continue
        fill = float("-inf") if kind == "max" else 0.0
        vec = torch.stack([torch.as_tensor(local.get(k, fill), dtype=torch.float64).to(device).reshape(())
                           for k in keys])
        if world:
            dist.all_reduce(vec, op=dist.ReduceOp.MAX if kind == "max" else dist.ReduceOp.SUM)
        out.update(zip(keys, vec.tolist()))
    return out
