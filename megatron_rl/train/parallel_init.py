"""Initialise Megatron's parallel state from the layout, with errors that name the fix."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_rl.model.build import Layout
from megatron_rl.parallel.groups import ParallelGroups


def check_layout(layout: Layout, world_size: int) -> int:
    """Raise ``ValueError`` naming the sizes if ``layout`` cannot tile ``world_size``; returns DP."""
    dense = layout.tp * layout.pp * layout.cp
    if world_size % dense:
        raise ValueError(
            f"parallel: world size {world_size} is not divisible by tensor x pipeline x context "
            f"parallel = {layout.tp} x {layout.pp} x {layout.cp} = {dense}")
    expert = layout.ep * layout.expert_tp * layout.pp
    if world_size % expert:
        raise ValueError(
            f"parallel: world size {world_size} is not divisible by expert x expert-tensor x "
            f"pipeline parallel = {layout.ep} x {layout.expert_tp} x {layout.pp} = {expert}")
    if layout.ep == 1 and layout.expert_tp != layout.tp:
        # megatron-core 0.16 then treats expert weights as dense: their gradients are reduced over
        # DP only, not over the TP ranks that each routed a different share of the tokens
        raise ValueError(
            f"parallel.expert_tensor_parallel_size={layout.expert_tp} must equal "
            f"tensor_model_parallel_size={layout.tp} when expert_model_parallel_size is 1 "
            "(leave it unset, or use expert parallelism)")
    return world_size // dense


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


def destroy_megatron_parallel() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
