"""DAPO helpers (Yu et al. 2025): dynamic-sampling filter and overlong reward shaping.

Legend: ``B`` responses, ``rewards[B]``, ``group_ids[B]`` prompt index in ``[0, B)``.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def dynamic_sampling_keep(rewards: Tensor, group_ids: Tensor, atol: float = 0.0) -> Tensor:
    """Bool ``[B]``: keep responses whose group's rewards are not all equal (within ``atol``).

    A group where every response got the same reward has zero group-normalised advantage
    everywhere: it costs a forward/backward and teaches nothing. The trainer over-samples and
    keeps drawing until enough groups pass (DAPO's dynamic sampling).
    """
    r = rewards.double()
    big = torch.full_like(r, float("inf"))
    gmax = (-big).scatter_reduce(0, group_ids, r, reduce="amax", include_self=True)
    gmin = big.scatter_reduce(0, group_ids, r, reduce="amin", include_self=True)
    spread = (gmax - gmin).index_select(0, group_ids)
    return spread > atol


def overlong_penalty(
    response_lengths: Tensor, *, max_len: int, buffer_len: int, penalty_factor: float = 1.0
) -> Tensor:
    """DAPO's soft overlong punishment ``[B]``, to be added to the reward.

    0 up to ``max_len - buffer_len`` tokens, then falling linearly to ``-penalty_factor`` at
    ``max_len``, and ``-penalty_factor`` beyond (a truncated response).
    """
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"overlong buffer_len must be in (0, max_len={max_len}], got {buffer_len}")
    length = response_lengths.to(torch.float64)
    expected = max_len - buffer_len
    ramp = (expected - length) / buffer_len
    pen = torch.where(length <= expected, torch.zeros_like(length), ramp).clamp(min=-1.0)
    return (pen * penalty_factor).to(torch.float32)
