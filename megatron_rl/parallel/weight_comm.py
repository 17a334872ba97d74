"""The collectives that move whole weights between ranks (checkpoint export, rollout weight sync).

Weights move outside autograd (callers hold ``torch.no_grad``): backward convention: none, and
every function here detaches. Every rank of the group named must make the same calls in the same
order (the callers iterate one plan that every rank holds).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_rl.parallel.collectives import Group, group_size

Tensor = torch.Tensor


def gather_pieces(piece: Tensor, group: Group) -> List[Tensor]:
    """Every rank's ``piece`` (same shape on all ranks of ``group``) in group-rank order: the TP
    (or expert-TP) shards of one weight. ``group=None``: ``[piece]``."""
    if group_size(group) == 1:
        return [piece.detach()]
    piece = piece.detach().contiguous()
    out = [torch.empty_like(piece) for _ in range(group_size(group))]
    dist.all_gather(out, piece, group=group)
    return out


def move_whole(whole: Optional[Tensor], shape: Sequence[int], dtype: torch.dtype, device,
               src: int, dst: Optional[int]) -> Optional[Tensor]:
    """Bring the tensor that global rank ``src`` holds to global rank ``dst`` (point to point),
    or to every rank when ``dst`` is None (a broadcast over the world). Ranks that are neither
    pass ``whole=None`` and get None back (they still call, so that the world stays in step)."""
    me = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return whole
    if dst is None:
        buf = whole.detach().contiguous() if me == src else torch.empty(tuple(shape), dtype=dtype, device=device)
        dist.broadcast(buf, src=src)
        return buf
    if src == dst:
        return whole if me == dst else None
    if me == src:
        dist.send(whole.detach().contiguous(), dst=dst)
        return None
    if me == dst:
        buf = torch.empty(tuple(shape), dtype=dtype, device=device)
        dist.recv(buf, src=src)
        return buf
    return None


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (small, picklable metadata of our own making; never weights)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
