"""Checkpoint metadata passes at MoE scale: three of torch.distributed.checkpoint's, exact and
near-linear, for the duration of our saves and loads (``scalable_planning``).

Legend: ``n`` shards (chunks) of one tensor key, ``d`` its dims, ``lo``/``hi`` int64 ``[n, d]``
arrays of each shard's first and one-past-last index per dim.

megatron-core's ``torch_dist`` format describes a tensor key as the whole grid of its shards, on
every rank (``sharded_tensor_to_torch_sharded_tensor`` enumerates it): layers x experts x the
gate/up halves. DeepSeek-V3's routed fc1 is 61 x 256 x 2 = 31,232 shards. Three passes over that
grid are quadratic in torch 2.13, because their sweep line runs along the dim of largest *extent*
(a hidden dim, which no shard splits), so every shard stays in the sweep's active set:

* shard overlap validation (``_shard/sharding_spec/_internals._find_nd_overlapping_shards``),
  twice per key at every save and load: n^2/2 pair checks;
* read planning (``checkpoint/planner_helpers.create_read_items_for_chunk_list``): n_local x
  n_saved;
* write-item lookup (``checkpoint/utils._find_shard``): a scan of the local shards per item when
  its index hint misses, which megatron-core's items do: n^2.

(slime patches the first for the same reason, THUDM/slime#1342.) The replacements sweep along the
dim that minimises the candidate pairs, compare the candidates vectorised, and look shards up by
offset. Where a case is outside what they were proven on (a zero-size shard, a 0-d tensor, a
signature this torch does not have), the original runs: the results are torch's, only faster.
``tests/unit/test_dcp_scale.py`` compares each with the original on random layouts.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

# candidate pairs compared per vectorised block: bounds the temporaries to ~100 MB at d = 4
_PAIR_BLOCK = 1 << 20


def _bounds(offsets: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]]):
    """``(lo, hi)`` int64 ``[n, d]`` from per-shard offsets and sizes."""
    lo = np.asarray([list(o) for o in offsets], dtype=np.int64).reshape(len(offsets), -1)
    hi = lo + np.asarray([list(s) for s in sizes], dtype=np.int64).reshape(lo.shape)
    return lo, hi


def _windows(lo_a, hi_a, lo_b, hi_b, dim: int):
    """For each ``a``: the run ``[start, stop)`` of ``b`` (in ``order``, ``b`` sorted by its start
    on ``dim``) that can overlap it on ``dim``; a ``b`` that overlaps starts after
    ``lo_a - longest b`` and before ``hi_a``."""
    order = np.argsort(lo_b[:, dim], kind="stable")
    starts = lo_b[order, dim]
    longest = int((hi_b[:, dim] - lo_b[:, dim]).max())
    start = np.searchsorted(starts, lo_a[:, dim] - longest, side="right")
    stop = np.searchsorted(starts, hi_a[:, dim], side="left")
    return order, start, np.maximum(stop, start)


def _best_dim(lo_a, hi_a, lo_b, hi_b) -> int:
    """The sweep dim with the fewest candidate pairs (ties: the lowest dim)."""
    totals = []
    for dim in range(lo_a.shape[1]):
        _, start, stop = _windows(lo_a, hi_a, lo_b, hi_b, dim)
        totals.append(int((stop - start).sum()))
    return int(np.argmin(totals))


def overlapping_pairs(lo_a, hi_a, lo_b, hi_b) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Every ``(a, b)`` whose boxes share a cell, as blocks of index arrays ``(ia, ib)`` in
    ``a``-major order. Boxes must have no zero-size dim (``_degenerate``)."""
    dim = _best_dim(lo_a, hi_a, lo_b, hi_b)
    order, start, stop = _windows(lo_a, hi_a, lo_b, hi_b, dim)
    counts = stop - start
    ends = np.cumsum(counts)
    first = 0
    while first < len(counts):
        # a block of whole rows of ``a`` with at most _PAIR_BLOCK candidates (at least one row)
        base = ends[first - 1] if first else 0
        last = max(int(np.searchsorted(ends, base + _PAIR_BLOCK, side="right")), first + 1)
        rows = np.arange(first, last)
        n = counts[rows]
        ia = np.repeat(rows, n)
        within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        ib = order[np.repeat(start[rows], n) + within]
        hit = np.all((lo_a[ia] < hi_b[ib]) & (lo_b[ib] < hi_a[ia]), axis=1)
        if hit.any():
            yield ia[hit], ib[hit]
        first = last


def _degenerate(lo, hi) -> bool:
    """A 0-d tensor or a zero-size shard: torch's own pass decides those."""
    return lo.shape[1] == 0 or bool((hi <= lo).any())


def find_nd_overlapping_shards(shards, sharded_dims: List[int],
                               original: Callable) -> Optional[Tuple[int, int]]:
    """Some pair of ``shards`` (``ShardMetadata``) that overlap, or None: torch's
    ``_find_nd_overlapping_shards`` with the sweep along the best dim."""
    if len(shards) <= 1 or not sharded_dims:
        return original(shards, sharded_dims)
    lo, hi = _bounds([s.shard_offsets for s in shards], [s.shard_sizes for s in shards])
    if _degenerate(lo, hi):
        return original(shards, sharded_dims)
    for ia, ib in overlapping_pairs(lo, hi, lo, hi):
        other = ia != ib
        if other.any():
            i, j = int(ia[other][0]), int(ib[other][0])
            return (min(i, j), max(i, j))
    return None


def create_read_items_for_chunk_list(fqn: str, checkpoint_md, local_chunks, original: Callable):
    """torch's ``create_read_items_for_chunk_list``: the reads that fill ``local_chunks`` from
    the saved chunks of ``checkpoint_md``, one per overlapping (local, saved) pair, built by
    torch's own helpers; in local-chunk order, then saved-chunk order."""
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner_helpers import _create_read_item_for_tensor
    from torch.distributed.checkpoint.resharding import _shards_get_overlap_region_wrt_saved_tensor

    saved = checkpoint_md.chunks
    if not local_chunks or not saved:
        return original(fqn, checkpoint_md, local_chunks)
    lo_l, hi_l = _bounds([c.offsets for c in local_chunks], [c.sizes for c in local_chunks])
    lo_s, hi_s = _bounds([c.offsets for c in saved], [c.sizes for c in saved])
    if _degenerate(lo_l, hi_l) or _degenerate(lo_s, hi_s) or lo_l.shape[1] != lo_s.shape[1]:
        return original(fqn, checkpoint_md, local_chunks)
    items = []
    for ia, ib in overlapping_pairs(lo_l, hi_l, lo_s, hi_s):
        for local_idx, storage_idx in sorted(zip(ia.tolist(), ib.tolist())):
            local, chunk = local_chunks[local_idx], saved[storage_idx]
            region = list(_shards_get_overlap_region_wrt_saved_tensor(
                saved_shard=chunk, current_shard=local))
            items.append(_create_read_item_for_tensor(
                dest_index=MetadataIndex(fqn, local.offsets, local_idx),
                dest_offsets=[r[2] for r in region],
                storage_index=MetadataIndex(fqn, chunk.offsets, storage_idx),
                storage_offsets=[r[1] for r in region],
                lengths=[r[3] for r in region]))
    return items


class ShardIndex:
    """torch's ``_find_shard`` (the local shard of a ``ShardedTensor`` at an offset) through a
    per-tensor dict built once; entries live as long as the ``scalable_planning`` block."""

    def __init__(self, original: Callable):
        self.original = original
        self._by_list: Dict[int, Tuple[list, int, Dict[tuple, object]]] = {}

    def __call__(self, tensor, index):
        """The shard ``original`` would return, found without scanning."""
        shards = tensor.local_shards()
        if index.offset is None or not isinstance(shards, list):
            return self.original(tensor, index)
        if index.index is not None and index.index < len(shards):   # torch's hint, kept first
            hinted = shards[index.index]
            if tuple(hinted.metadata.shard_offsets) == tuple(index.offset):
                return hinted
        entry = self._by_list.get(id(shards))
        if entry is None or entry[0] is not shards or entry[1] != len(shards):
            table: Dict[tuple, object] = {}
            for s in shards:   # the first shard at an offset, as the scan finds it
                table.setdefault(tuple(s.metadata.shard_offsets), s)
            entry = self._by_list[id(shards)] = (shards, len(shards), table)
        hit = entry[2].get(tuple(index.offset))
        return hit if hit is not None else self.original(tensor, index)


def _replacements() -> List[Tuple[object, str, Callable[[Callable], Callable], Tuple[str, ...]]]:
    """``(module, attribute, wrap(original) -> replacement, parameters it must have)``."""
    from torch.distributed._shard.sharding_spec import _internals
    from torch.distributed.checkpoint import planner_helpers, utils

    return [
        (_internals, "_find_nd_overlapping_shards",
         lambda orig: lambda shards, sharded_dims: find_nd_overlapping_shards(
             shards, sharded_dims, orig),
         ("shards", "sharded_dims")),
        (planner_helpers, "create_read_items_for_chunk_list",
         lambda orig: lambda fqn, checkpoint_md, local_chunks: create_read_items_for_chunk_list(
             fqn, checkpoint_md, local_chunks, orig),
         ("fqn", "checkpoint_md", "local_chunks")),
        (utils, "_find_shard", ShardIndex, ("tensor", "index")),
    ]


def _has(module, name: str, params: Tuple[str, ...]) -> bool:
    fn = getattr(module, name, None)
    try:
        return fn is not None and tuple(inspect.signature(fn).parameters) == params
    except (TypeError, ValueError):
        return False


@contextmanager
def scalable_planning():
    """Within the block, torch's three quadratic checkpoint passes run as this module's exact
    near-linear ones (those this torch has with the expected signature; the others are left)."""
    undo = []
    try:
        for module, name, wrap, params in _replacements():
            if _has(module, name, params):
                orig = getattr(module, name)
                setattr(module, name, wrap(orig))
                undo.append((module, name, orig))
        yield [name for _, name, _ in undo]
    finally:
        for module, name, orig in reversed(undo):
            setattr(module, name, orig)
