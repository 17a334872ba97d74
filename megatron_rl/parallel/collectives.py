"""The collectives of the loss path, as small autograd Functions with a stated backward.

Which backward an all-reduce needs depends on how the loss that consumes its output is summed:

* replicated: every rank of the group computes the *same* loss from the reduced value (TP ranks
  after the vocab-parallel reductions). The objective is that loss once, so each rank's input
  affects it with coefficient 1: the backward is the identity. Summing in the backward multiplies
  every gradient by the group size.
* partial: every rank computes its *own share* of the loss (DP and CP ranks: each holds other
  tokens), and the objective is the sum of the shares. A rank's input reaches every share through
  the reduced value, so the backward must all-reduce (sum) the incoming gradients. An identity
  backward silently drops the other ranks' terms.

``group=None`` means the dimension is not parallel (size 1): every function is then a no-op, so
callers need no special case. Pass ``torch.distributed.group.WORLD`` explicitly for the world.
Every rank of a group must call the same collectives in the same order, whatever its data (a rank
whose tokens are all masked still joins), or the group deadlocks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# torch 2.13 renamed the fused collectives (``*_tensor`` -> ``*_single``; the old names warn at
# every call); the torch of older NGC images has only the old names
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

Tensor = torch.Tensor
Group = Optional[dist.ProcessGroup]


def group_size(group: Group) -> int:
    """The size of ``group`` (1 for None: no group)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    """This rank's index in ``group`` (0 for None)."""
    return 0 if group is None else dist.get_rank(group)


def all_reduce_nograd(x: Tensor, group: Group, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
    """All-reduce of a statistic that is a constant of the loss (counts, maxima, group means).

    Returns a new tensor (the input is left untouched) and records no graph: use it only where the
    result is detached by definition. Backward convention: none.
    """
    out = x.detach().clone()
    if group_size(group) > 1:
        dist.all_reduce(out, op=op, group=group)
    return out


def all_gather_nograd(x: Tensor, group: Group, dim: int = 0) -> Tensor:
    """Concatenation along ``dim`` of every rank's ``x`` (same shape on every rank), in rank order,
    for data that is no function of the weights (expert routes: integers). ``x`` may live on the
    host under NCCL: it crosses on the current GPU and comes back where it was.

    Records no graph. Backward convention: none (nothing to differentiate).
    """
    if group_size(group) == 1:
        return x
    nccl = dist.get_backend(group) == "nccl"
    wire = x.detach().to(torch.device("cuda", torch.cuda.current_device()) if nccl else x.device)
    if wire.dtype == torch.int16 and not nccl:   # gloo has no int16 (our routes' dtype)
        wire = wire.to(torch.int32)
    parts = [torch.empty_like(wire) for _ in range(group_size(group))]
    dist.all_gather(parts, wire.contiguous(), group=group)
    return torch.cat(parts, dim=dim).to(device=x.device, dtype=x.dtype)


class _AllReduceReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Group) -> Tensor:
        """Sum over ``group`` of a value every rank then uses identically."""
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        """Identity: each rank's identical loss already carries the whole gradient."""
        return grad, None


class _AllReducePartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Group) -> Tensor:
        """Sum over ``group`` of per-rank partial values."""
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        """Sum over ``group``: each rank's partial loss contributes to every input's gradient."""
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


def all_reduce_replicated(x: Tensor, group: Group) -> Tensor:
    """Sum over ``group``; backward = identity.

    For a value that feeds a loss every rank of ``group`` computes identically (tensor-parallel
    ranks): the loss counts once, so each rank's share reaches it with coefficient 1.
    """
    return x if group_size(group) == 1 else _AllReduceReplicated.apply(x, group)


def all_reduce_partial(x: Tensor, group: Group) -> Tensor:
    """Sum over ``group``; backward = all-reduce sum of the gradients.

    For a value that feeds per-rank partial losses whose sum is the objective (context- and
    data-parallel ranks): every rank's share reaches every partial loss, so the gradient of a
    share is the sum over ranks of the gradients each partial loss sends back.
    """
    return x if group_size(group) == 1 else _AllReducePartial.apply(x, group)


def _reduce_scatter_sum(grad: Tensor, group, dim: int) -> Tensor:
    """This rank's slice (along ``dim``) of the sum over ``group`` of ``grad``. NCCL reduce-scatters;
    gloo has no reduce-scatter, so it all-reduces and keeps the slice (same sum, more bytes)."""
    p, r = dist.get_world_size(group), dist.get_rank(group)
    n = grad.shape[dim] // p
    if dist.get_backend(group) != "gloo":
        chunks = grad.movedim(dim, 0).contiguous()
        out = chunks.new_empty((n,) + tuple(chunks.shape[1:]))
        reduce_scatter_single(out, chunks, group=group)
        return out.movedim(0, dim)
    total = grad.contiguous().clone()
    dist.all_reduce(total, group=group)
    return total.narrow(dim, r * n, n).contiguous()


class _AllGatherPartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Group, dim: int) -> Tensor:
        """Concatenation along ``dim`` of every rank's ``x``."""
        ctx.group, ctx.dim = group, dim
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        """This rank's slice of the gradient summed over ``group`` (reduce-scatter)."""
        return _reduce_scatter_sum(grad, ctx.group, ctx.dim), None, None


def all_gather_partial(x: Tensor, group: Group, dim: int = 0) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim``, in rank order; backward = reduce-scatter
    (sum) of the gradients, each rank keeping the slice of its own ``x``.

    For per-rank partial losses that all read every rank's share (context-parallel attention:
    the queries of every CP rank attend the keys and values this rank holds). The gradient of a
    share is the sum of what every partial loss sends back to it; an identity backward (keeping
    only this rank's own gradient slice) would drop the other ranks' queries' terms.
    """
    return x if group_size(group) == 1 else _AllGatherPartial.apply(x, group, dim)


class RingShift:
    """``x`` sent to the next rank of ``group`` (index + 1, cyclic) while the previous rank's is
    received, started at construction so that compute overlaps it; ``wait()`` returns what
    arrived. Backward convention: none. It is a plain exchange for autograd Functions that run
    their own ring in the backward (``model.ring_attention``) and state its convention there."""

    def __init__(self, x: Tensor, group: Group):
        size, rank = group_size(group), group_rank(group)
        nxt = dist.get_global_rank(group, (rank + 1) % size)
        prev = dist.get_global_rank(group, (rank - 1) % size)
        self.received = torch.empty(x.shape, dtype=x.dtype, device=x.device)   # contiguous
        self._sent = x.contiguous()   # kept alive until the send completes
        self._reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, self._sent, nxt, group),
                                             dist.P2POp(dist.irecv, self.received, prev, group)])

    def wait(self) -> Tensor:
        """What the previous rank sent, once both transfers are done."""
        for req in self._reqs:
            req.wait()
        return self.received
