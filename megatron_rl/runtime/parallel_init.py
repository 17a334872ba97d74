"""Initialise Megatron's parallel state from the layout, with errors that name the fix."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_rl.model.cpu_patches import apply_cpu_patches
from megatron_rl.parallel.config import Layout, check_layout
from megatron_rl.parallel.groups import ParallelGroups, ShardGroups


def _or_none(group):
    return group if dist.get_world_size(group) > 1 else None


# megatron-core's destroy_model_parallel forgets its groups without destroying them: on CPU each
# gloo group keeps its device threads, and a process that initialises Megatron again and again
# (the conversion checks, the tests) piles up thousands of them, which then take minutes to tear
# down at exit. The groups created by the last init, destroyed with it (CPU only: on GPU a run
# initialises once, and NCCL teardown is left to the process's end as before).
_CREATED: list = []


def _process_groups() -> list:
    from torch.distributed import distributed_c10d as c10d

    world = getattr(c10d, "_world", None)
    return list(getattr(world, "pg_map", {}) or {})


def init_megatron_parallel(layout: Layout, seed: int, cpu_patches: bool = True) -> ParallelGroups:
    """``torch.distributed`` must be initialised. Applies the CPU patches when there is no GPU
    (``cpu_patches=False`` leaves that to the caller: the tests that prove each patch is still
    needed), initialises ``parallel_state`` and the model-parallel RNG; returns the loss path's
    groups."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    check_layout(layout, dist.get_world_size())
    if cpu_patches:
        apply_cpu_patches()
    before = set(_process_groups())
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp, expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp)
    if not torch.cuda.is_available():
        _CREATED[:] = [g for g in _process_groups() if g not in before and g is not dist.group.WORLD]
    torch.manual_seed(seed)  # as Megatron's own initialisation: weights depend on the seed only
    model_parallel_cuda_manual_seed(seed)
    return ParallelGroups(
        tp=_or_none(ps.get_tensor_model_parallel_group()),
        cp=_or_none(ps.get_context_parallel_group()),
        dp=_or_none(ps.get_data_parallel_group()),
        dp_cp=_or_none(ps.get_data_parallel_group(with_context_parallel=True)))


def compute_device() -> torch.device:
    """Where this rank computes: its current CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def weight_groups():
    """Where this rank's weights sit, for the HF weight mapping (``checkpoint.hf_weights``)."""
    from megatron.core import parallel_state as ps

    return ShardGroups(tp=_or_none(ps.get_tensor_model_parallel_group()),
                       etp=_or_none(ps.get_expert_tensor_parallel_group()),
                       ep_rank=ps.get_expert_model_parallel_rank(),
                       ep_size=ps.get_expert_model_parallel_world_size())


def destroy_megatron_parallel() -> None:
    """Megatron's parallel state reset, and on CPU the process groups it created destroyed."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    live = set(_process_groups())
    for group in _CREATED:
        if group in live:
            dist.destroy_process_group(group)
    _CREATED.clear()
