"""Megatron's load-balanced context-parallel layout, for padded (BSHD) and packed (THD) batches.

A sequence padded to a multiple of ``2*cp`` is cut into ``2*cp`` equal chunks; CP rank ``r`` holds
chunks ``r`` and ``2*cp-1-r``, in that order (causal attention costs the same on every rank). THD
does this per sequence, with the padded boundaries ``cu_seqlens_padded``. Labels and masks are
shifted *before* slicing (``shift_left``), so a label never has to cross a chunk boundary.

Conventions: BSHD full tensors are ``[B, S, ...]`` (sequence dim 1, as in Megatron);
THD full tensors are ``[T, ...]`` (the packed stream, sequence dim 0). Legend: ``B`` sequences,
``S`` padded length, ``T`` packed length, ``C`` chunk length, ``N`` tokens held by this rank.

``CPShard`` describes one rank's share and re-lays its per-token scalars as a ``[B, 2C]`` view:
row ``b`` holds sequence ``b``'s two chunks (columns ``[0, C)`` chunk ``r``, ``[C, 2C)`` chunk
``2cp-1-r``; THD rows shorter than ``C`` per chunk are padded with zeros and ``valid`` False).
The algo functions run on that view; ``parallel.seq_ops`` reduces across it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor


def padded_length(n: int, cp_size: int, tp_size: int = 1) -> int:
    """Smallest multiple of ``2*cp_size*tp_size`` that holds ``n`` tokens: ``2*cp`` chunks, each
    rank's share split evenly over the TP ranks by sequence parallelism (Megatron asserts it)."""
    q = 2 * cp_size * tp_size
    return -(-n // q) * q


def chunk_ids(cp_size: int, cp_rank: int) -> Tuple[int, int]:
    """The two chunks rank ``cp_rank`` holds, in local order."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside [0, {cp_size})")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def _check_multiple(length: int, cp_size: int, what: str) -> None:
    if length % (2 * cp_size):
        raise ValueError(f"{what} {length} is not a multiple of 2*cp = {2 * cp_size}; pad each "
                         f"sequence to padded_length(n, {cp_size}) before sharding")


def shift_left(x: Tensor, dim: int = 1, cu_seqlens_padded: Optional[Sequence[int]] = None,
               fill=0) -> Tensor:
    """``out[p] = x[p+1]`` along ``dim`` within each sequence; the last position of every
    sequence gets ``fill`` (it has no next token). Labels and loss masks go through this before
    sharding. ``cu_seqlens_padded`` marks the sequences of a packed (THD) stream."""
    out = torch.roll(x, -1, dims=dim)
    ends = [x.shape[dim] - 1] if cu_seqlens_padded is None else [c - 1 for c in cu_seqlens_padded[1:]]
    idx = torch.tensor(ends, dtype=torch.long, device=x.device)
    return out.index_fill(dim, idx, fill)


def bshd_shard(x: Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> Tensor:
    """This rank's ``[..., S/cp, ...]`` share of a padded batch (what megatron-core's
    ``get_batch_on_this_cp_rank`` does to each tensor of the batch)."""
    if cp_size == 1:
        return x
    S = x.shape[dim]
    _check_multiple(S, cp_size, "sequence length")
    q = 2 * cp_size
    v = x.reshape(*x.shape[:dim], q, S // q, *x.shape[dim + 1:])
    idx = torch.tensor(chunk_ids(cp_size, cp_rank), device=x.device)
    return v.index_select(dim, idx).reshape(*x.shape[:dim], -1, *x.shape[dim + 1:])


def bshd_unshard(shards: Sequence[Tensor], dim: int = 1) -> Tensor:
    """Inverse of ``bshd_shard`` given every rank's share, in CP-rank order."""
    cp = len(shards)
    if cp == 1:
        return shards[0]
    chunks: List[Optional[Tensor]] = [None] * (2 * cp)
    for r, s in enumerate(shards):
        a, b = s.chunk(2, dim=dim)
        i, j = chunk_ids(cp, r)
        chunks[i], chunks[j] = a, b
    return torch.cat(chunks, dim=dim)


def thd_partition_index(cu_seqlens_padded: Sequence[int], cp_size: int, cp_rank: int,
                        device=None) -> Tensor:
    """Indices into the packed stream of the tokens rank ``cp_rank`` holds, in local order (the
    semantics of TransformerEngine's ``thd_get_partitioned_indices``)."""
    i, j = chunk_ids(cp_size, cp_rank)
    parts = []
    for start, end in zip(cu_seqlens_padded[:-1], cu_seqlens_padded[1:]):
        _check_multiple(end - start, cp_size, f"padded sequence length (at offset {start})")
        c = (end - start) // (2 * cp_size)
        parts += [torch.arange(start + i * c, start + (i + 1) * c),
                  torch.arange(start + j * c, start + (j + 1) * c)]
    return torch.cat(parts).to(device) if parts else torch.zeros(0, dtype=torch.long, device=device)


def thd_shard(x: Tensor, cu_seqlens_padded: Sequence[int], cp_size: int, cp_rank: int,
              dim: int = 0) -> Tensor:
    """This rank's share of a packed stream (``[T, ...]`` along ``dim``)."""
    if cu_seqlens_padded[-1] != x.shape[dim]:
        raise ValueError(f"cu_seqlens_padded ends at {cu_seqlens_padded[-1]} but the packed "
                         f"tensor has {x.shape[dim]} tokens along dim {dim}")
    return x.index_select(dim, thd_partition_index(cu_seqlens_padded, cp_size, cp_rank, x.device))


def thd_unshard(shards: Sequence[Tensor], cu_seqlens_padded: Sequence[int], dim: int = 0) -> Tensor:
    """Inverse of ``thd_shard`` given every rank's share, in CP-rank order."""
    cp = len(shards)
    index = torch.cat([thd_partition_index(cu_seqlens_padded, cp, r) for r in range(cp)])
    cat = torch.cat(list(shards), dim=dim)
    return torch.empty_like(cat).index_copy_(dim, index.to(cat.device), cat)


@dataclass(frozen=True)
class CPShard:
    """One CP rank's share of a micro-batch, and the ``[B, 2C]`` view of its per-token scalars.

    Build it with ``CPShard.bshd`` or ``CPShard.thd`` from lengths the batch builder already has on
    the host: nothing here reads a device tensor back.

    ``positions[B, 2C]``: each view slot's position in its (padded) sequence; ``valid[B, 2C]``:
    False on THD padding slots; ``chunks``: the global chunk index of view columns ``[0, C)`` and
    ``[C, 2C)``; ``positions_aligned``: the ``j``-th action of every member of a group sits in the
    same view column, so per-action group statistics need no communication. It takes the caller's
    word that each group's actions are one contiguous run from one start (``actions_aligned``:
    single-turn responses to one prompt; ``train.batches.actions_share_columns`` checks it), and
    for THD also that each group's members share a padded length. Without that word the
    statistics pool by action index over CP, which is right for every layout.
    """

    cp_size: int
    cp_rank: int
    num_seqs: int
    chunk_len: int
    max_len: int
    positions: Tensor
    valid: Tensor
    positions_aligned: bool
    view_index: Optional[Tensor] = None    # THD: view slot -> local token (N = padding zero)
    token_index: Optional[Tensor] = None   # THD: local token -> view slot

    @property
    def chunks(self) -> Tuple[int, int]:
        """The global indices of the two chunks this rank holds."""
        return chunk_ids(self.cp_size, self.cp_rank)

    @classmethod
    def bshd(cls, num_seqs: int, seq_len: int, cp_size: int, cp_rank: int, device=None,
             actions_aligned: bool = False) -> "CPShard":
        """The shard of a padded ``[B, S]`` batch for this CP rank (``S`` a multiple of ``2 cp``)."""
        _check_multiple(seq_len, cp_size, "sequence length")
        C = seq_len // (2 * cp_size)
        i, j = chunk_ids(cp_size, cp_rank)
        cols = torch.cat([torch.arange(i * C, (i + 1) * C), torch.arange(j * C, (j + 1) * C)])
        positions = cols.expand(num_seqs, -1).to(device)
        valid = torch.ones(num_seqs, 2 * C, dtype=torch.bool, device=device)
        return cls(cp_size, cp_rank, num_seqs, C, seq_len, positions, valid, actions_aligned)

    @classmethod
    def thd(cls, cu_seqlens_padded: Sequence[int], cp_size: int, cp_rank: int, device=None,
            group_of_seq: Optional[Sequence[int]] = None,
            actions_aligned: bool = False) -> "CPShard":
        """``group_of_seq[b]`` (host ints, optional) lets the shard see whether every group's
        members share a padded length (then per-position statistics stay local)."""
        lens = [e - s for s, e in zip(cu_seqlens_padded[:-1], cu_seqlens_padded[1:])]
        for s, n in zip(cu_seqlens_padded, lens):
            _check_multiple(n, cp_size, f"padded sequence length (at offset {s})")
        B, q = len(lens), 2 * cp_size
        c = [n // q for n in lens]
        C = max(c, default=0)
        i, j = chunk_ids(cp_size, cp_rank)
        k = torch.arange(C)
        half_valid = k[None, :] < torch.tensor(c)[:, None]                       # [B, C]
        valid = torch.cat([half_valid, half_valid], dim=1)
        cb = torch.tensor(c)[:, None]
        positions = torch.cat([i * cb + k, j * cb + k], dim=1) * valid            # [B, 2C]
        local_start = torch.tensor([0] + [2 * x for x in c]).cumsum(0)[:-1, None]  # [B, 1]
        local = torch.cat([local_start + k, local_start + cb + k], dim=1)
        N = 2 * sum(c)
        view_index = torch.where(valid, local, torch.full_like(local, N)).flatten()
        token_index = torch.arange(B * 2 * C).view(B, 2 * C)[valid]   # row-major = local order
        aligned = (actions_aligned and group_of_seq is not None
                   and _groups_share_length(group_of_seq, lens))
        return cls(cp_size, cp_rank, B, C, max(lens, default=0), positions.to(device),
                   valid.to(device), aligned, view_index.to(device), token_index.to(device))

    def to_view(self, x: Tensor) -> Tensor:
        """Local per-token tensor (BSHD ``[B, S/cp]``, THD ``[N]``) -> ``[B, 2C]`` (differentiable;
        THD padding slots are 0)."""
        if self.view_index is None:
            return x.reshape(self.num_seqs, 2 * self.chunk_len)
        flat = torch.cat([x.reshape(-1), x.new_zeros(1)])
        return flat.index_select(0, self.view_index).view(self.num_seqs, 2 * self.chunk_len)

    def from_view(self, v: Tensor) -> Tensor:
        """``[B, 2C]`` -> the local per-token layout (BSHD ``[B, S/cp]``, THD ``[N]``)."""
        if self.token_index is None:
            return v
        return v.reshape(-1).index_select(0, self.token_index)


def _groups_share_length(group_of_seq: Sequence[int], lens: Sequence[int]) -> bool:
    if len(group_of_seq) != len(lens):
        raise ValueError(f"group_of_seq has {len(group_of_seq)} entries for {len(lens)} sequences")
    first = {}
    return all(first.setdefault(g, n) == n for g, n in zip(group_of_seq, lens))
