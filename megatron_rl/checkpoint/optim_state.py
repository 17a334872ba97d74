"""The distributed optimizer's state in checkpoints, and what megatron-core gets wrong about it
when the optimizer is torch's Adam (no Apex / TransformerEngine: CPU, or a plain CUDA install).

Formats (``train.optimizer_checkpoint``): ``dp_reshardable`` saves each DP x CP rank's flat
buffer shard, fast, and resumes under other DP and CP sizes only; ``fully_reshardable`` gathers
each parameter's state (on DP rank 0 of its group at save time) and resumes under other TP, PP,
CP and DP sizes. Neither follows a change of expert parallelism (``dist_ckpt._check_resharding``
refuses it). Three torch-Adam problems, the same on megatron-core 0.16 and 0.19, are handled here:

- a fresh optimizer has no Adam state, and building the sharded state dict asserts one shared
  ``step``: ``prime_adam_state`` gives every parameter an empty state first;
- Adam's ``step`` comes back as 0 through the state dict: ``restore_adam_step`` takes it from the
  saved param groups (one set per optimizer when expert parallelism chains two);
- ``fully_reshardable`` loading skips ``step`` in the source tensors but copies every key of the
  destination's state, which has ``step``: KeyError 'step'. ``destination_keeps_adam_step``
  (scoped to the load) hands the destination's own ``step`` back, which ``load_state_dict`` has
  already set from the saved param groups.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator

import torch

OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")


def sharding_metadata(fmt: str) -> Dict[str, str]:
    """megatron-core's ``sharded_state_dict`` metadata for optimizer format ``fmt``; an unknown one
    fails listing the known."""
    if fmt not in OPTIMIZER_FORMATS:
        raise ValueError(f"unknown optimizer checkpoint format {fmt!r}; known: "
                         f"{', '.join(OPTIMIZER_FORMATS)}")
    return {"distrib_optim_sharding_type": fmt}


def _adams(optimizer):
    """The torch Adam of each (chained) distributed optimizer, in order; None where not Adam."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        yield inner if isinstance(inner, torch.optim.Adam) else None


def prime_adam_state(optimizer) -> None:
    """Create Adam's state (zeros, step 0) before any step, so that a checkpoint can be loaded into
    it."""
    for inner in _adams(optimizer):
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)


def restore_adam_step(optimizer, loaded: Dict[str, Any]) -> None:
    """``loaded``: the optimizer part of a loaded checkpoint (with expert parallelism the
    optimizer is a ``ChainedOptimizer`` and ``loaded`` one state per optimizer, keyed 0, 1, ...)."""
    adams = list(_adams(optimizer))
    parts = [loaded[k] for k in sorted(loaded)] if len(adams) > 1 else [loaded]
    for inner, part in zip(adams, parts):
        step = part.get("optimizer", {}).get("param_groups", [{}])[0].get("step")
        if step is not None and inner is not None:
            for st in inner.state.values():
                st["step"] = torch.tensor(float(step))


@contextlib.contextmanager
def destination_keeps_adam_step() -> Iterator[None]:
    """While active, loading the optimizer keeps the destination's Adam ``step`` layout (megatron-
    core overwrites it with the source's)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    orig = DistributedOptimizer.__dict__["_set_main_param_and_optimizer_states"]

    def set_states(self, model_param, tensors):
        """Upstream's setter, keeping the destination's Adam ``step`` when the source has none."""
        if "step" not in tensors and isinstance(self.optimizer, torch.optim.Adam):
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            own = self.optimizer.state[main_param].get("step")
            if own is not None:
                tensors = {**tensors, "step": own}
        return orig(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = orig
