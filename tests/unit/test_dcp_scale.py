"""The near-linear checkpoint metadata passes give torch's own answers (checkpoint.dcp_scale).

Reference: torch's original functions and, for overlap, a brute-force pairwise check. Layouts are
random grids (uneven splits, several split dims, like megatron-core's layer x expert x TP grids),
resharded grids for reads, and grids with one shard moved onto a neighbour."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest
import torch
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharding_spec import _internals
from torch.distributed.checkpoint import planner_helpers, utils
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)

from megatron_rl.checkpoint import dcp_scale
from megatron_rl.checkpoint.dcp_scale import (ShardIndex, create_read_items_for_chunk_list,
                                              find_nd_overlapping_shards, scalable_planning)

ORIG_OVERLAP = _internals._find_nd_overlapping_shards
ORIG_READS = planner_helpers.create_read_items_for_chunk_list
ORIG_FIND = utils._find_shard


def _cuts(rng: random.Random, size: int, pieces: int):
    """``pieces`` uneven intervals covering ``[0, size)``."""
    inner = sorted(rng.sample(range(1, size), pieces - 1)) if pieces > 1 else []
    edges = [0, *inner, size]
    return list(zip(edges[:-1], edges[1:]))


def _grid(rng: random.Random, shape, max_pieces=(6, 9, 3, 2)):
    """Boxes ``(offsets, sizes)`` tiling ``shape``: a random uneven split per dim."""
    per_dim = [_cuts(rng, n, rng.randint(1, min(m, n))) for n, m in zip(shape, max_pieces)]
    return [([a for a, _ in box], [b - a for a, b in box]) for box in itertools.product(*per_dim)]


def _brute_overlap(boxes) -> bool:
    return any(all(oa < ob + sb and ob < oa + sa for oa, sa, ob, sb in zip(*a, *b))
               for a, b in itertools.combinations(boxes, 2))


def _shards(boxes):
    return [ShardMetadata(list(o), list(s), "rank:0/cpu") for o, s in boxes]


def _sharded_dims(shards):
    return [d for d in range(len(shards[0].shard_offsets))
            if len({(s.shard_offsets[d], s.shard_sizes[d]) for s in shards}) > 1]


def _layouts(seed: int):
    rng = random.Random(seed)
    shape = [rng.randint(2, 12), rng.randint(2, 20), rng.randint(2, 9), rng.randint(1, 5)]
    boxes = _grid(rng, shape)
    yield boxes
    if len(boxes) > 1:  # one shard pushed into another's cells: must be found
        moved = [list(map(list, b)) for b in boxes]
        i = rng.randrange(len(moved))
        d = rng.randrange(len(shape))
        o, s = moved[i]
        if o[d] > 0:
            o[d] -= 1
        else:
            s[d] += 1
        yield [tuple(b) for b in moved]


@pytest.mark.parametrize("seed", range(40))
def test_overlap_search_finds_an_overlap_iff_brute_force_does(seed):
    for boxes in _layouts(seed):
        shards = _shards(boxes)
        dims = _sharded_dims(shards)
        if not dims:
            continue
        pair = find_nd_overlapping_shards(shards, dims, ORIG_OVERLAP)
        expect = _brute_overlap(boxes)
        assert (pair is not None) == expect == (ORIG_OVERLAP(shards, dims) is not None)
        if pair is not None:
            a, b = (boxes[i] for i in pair)
            assert pair[0] != pair[1] and _brute_overlap([a, b])


def test_overlap_search_at_expert_grid_scale_finds_the_one_overlap():
    """A 61 x 256 x 2 expert grid (DeepSeek-V3's routed fc1) with one duplicated shard."""
    boxes = [([l, e, h * 8, 0], [1, 1, 8, 4]) for l in range(61) for e in range(256)
             for h in range(2)]
    shards = _shards(boxes)
    assert find_nd_overlapping_shards(shards, [0, 1, 2], ORIG_OVERLAP) is None
    twin = _shards(boxes + [([37, 200, 8, 0], [1, 1, 8, 4])])
    pair = find_nd_overlapping_shards(twin, [0, 1, 2], ORIG_OVERLAP)
    assert pair is not None and {tuple(twin[i].shard_offsets) for i in pair} == {(37, 200, 8, 0)}


def _chunks(boxes):
    return [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in boxes]


def _key(item):
    return (item.type, item.dest_index.fqn, tuple(item.dest_index.offset), item.dest_index.index,
            tuple(item.dest_offsets), tuple(item.storage_index.offset), item.storage_index.index,
            tuple(item.storage_offsets), tuple(item.lengths))


@pytest.mark.parametrize("seed", range(30))
def test_read_plan_equals_torchs_for_resharded_grids(seed):
    rng = random.Random(seed)
    shape = [rng.randint(1, 10), rng.randint(1, 16), rng.randint(2, 12), rng.randint(1, 6)]
    saved = _chunks(_grid(rng, shape))
    local = _chunks(rng.sample(b := _grid(rng, shape), rng.randint(1, len(b))))
    md = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(shape), saved)
    ours = create_read_items_for_chunk_list("w", md, local, ORIG_READS)
    theirs = ORIG_READS("w", md, local)
    assert sorted(map(_key, ours)) == sorted(map(_key, theirs))
    assert sum(torch.Size(i.lengths).numel() for i in ours) == sum(c.sizes.numel() for c in local)
    order = [(i.dest_index.index, i.storage_index.index) for i in ours]
    assert order == sorted(order)


def test_read_plan_of_a_zero_size_chunk_is_torchs():
    md = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([4, 0]),
                               _chunks([([0, 0], [2, 0]), ([2, 0], [2, 0])]))
    local = _chunks([([0, 0], [4, 0])])
    assert list(map(_key, create_read_items_for_chunk_list("w", md, local, ORIG_READS))) == \
        list(map(_key, ORIG_READS("w", md, local)))


def _fake_tensor(offsets):
    shards = [SimpleNamespace(metadata=SimpleNamespace(shard_offsets=list(o)), tensor=i)
              for i, o in enumerate(offsets)]
    return SimpleNamespace(local_shards=lambda: shards)


def test_shard_lookup_returns_the_shard_torchs_scan_returns():
    offsets = [(l, e, 0) for l in range(5) for e in range(7)] + [(2, 3, 0)]  # a duplicate offset
    random.Random(0).shuffle(offsets)
    tensor = _fake_tensor(offsets)
    find = ShardIndex(ORIG_FIND)
    for o in sorted(set(offsets)):
        for hint in (None, 0, 3, 99):
            index = MetadataIndex("w", torch.Size(o), hint)
            assert find(tensor, index) is ORIG_FIND(tensor, index)
    with pytest.raises(ValueError, match="Could not find shard"):
        find(tensor, MetadataIndex("w", torch.Size((9, 9, 9)), None))


def test_scalable_planning_swaps_torchs_three_passes_for_the_block_only():
    with scalable_planning() as replaced:
        assert sorted(replaced) == ["_find_nd_overlapping_shards", "_find_shard",
                                    "create_read_items_for_chunk_list"]
        assert _internals._find_nd_overlapping_shards is not ORIG_OVERLAP
        assert planner_helpers.create_read_items_for_chunk_list is not ORIG_READS
        assert isinstance(utils._find_shard, ShardIndex)
    assert _internals._find_nd_overlapping_shards is ORIG_OVERLAP
    assert planner_helpers.create_read_items_for_chunk_list is ORIG_READS
    assert utils._find_shard is ORIG_FIND


def test_a_pass_with_another_signature_is_left_to_torch(monkeypatch):
    monkeypatch.setattr(utils, "_find_shard", lambda tensor, index, extra=None: None)
    with scalable_planning() as replaced:
        assert "_find_shard" not in replaced
    assert dcp_scale._has(_internals, "_find_nd_overlapping_shards", ("shards", "sharded_dims"))
