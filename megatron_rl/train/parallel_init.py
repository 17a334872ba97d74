"""Initialise Megatron's parallel state from the layout, with errors that name the fix."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_rl.parallel.config import Layout, check_layout
from megatron_rl.parallel.groups import ParallelGroups


def _or_none(group):
    return group if dist.get_world_size(group) > 1 else None


def init_megatron_parallel(layout: Layout, seed: int, cpu_patches: bool = True) -> ParallelGroups:
    """``torch.distributed`` must be initialised. Applies the CPU patches when there is no GPU
    (``cpu_patches=False`` leaves that to the caller: the tests that prove each patch is still
    needed), initialises ``parallel_state`` and the model-parallel RNG; returns the loss path's
    groups."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_rl.model.cpu_patches import apply_cpu_patches

    check_layout(layout, dist.get_world_size())
    if cpu_patches:
        apply_cpu_patches()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp, expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp)
    torch.manual_seed(seed)  # as Megatron's own initialisation: weights depend on the seed only
    model_parallel_cuda_manual_seed(seed)
    return ParallelGroups(
        tp=_or_none(ps.get_tensor_model_parallel_group()),
        cp=_or_none(ps.get_context_parallel_group()),
        dp=_or_none(ps.get_data_parallel_group()),
        dp_cp=_or_none(ps.get_data_parallel_group(with_context_parallel=True)))


def weight_groups():
    """Where this rank's weights sit, for the HF weight mapping (``checkpoint.hf_weights``)."""
    from megatron.core import parallel_state as ps

    from megatron_rl.checkpoint.hf_weights import ShardGroups

    return ShardGroups(tp=_or_none(ps.get_tensor_model_parallel_group()),
                       etp=_or_none(ps.get_expert_tensor_parallel_group()),
                       ep_rank=ps.get_expert_model_parallel_rank(),
                       ep_size=ps.get_expert_model_parallel_world_size())


def destroy_megatron_parallel() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
