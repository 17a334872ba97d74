"""Megatron's zigzag CP layout: round trips, agreement with megatron-core, the [B, 2C] view."""

import pytest
import torch
import torch.distributed as dist

from megatron_rl.parallel.cp_layout import (
    CPShard, bshd_shard, bshd_unshard, chunk_ids, padded_length, shift_left, thd_shard, thd_unshard,
)

CPS = [1, 2, 4]


def test_rank_r_holds_chunks_r_and_mirror():
    assert [chunk_ids(4, r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert padded_length(9, 2) == 12 and padded_length(8, 2) == 8 and padded_length(1, 4) == 8


@pytest.mark.parametrize("cp", CPS)
def test_bshd_shard_then_unshard_is_identity(cp):
    x = torch.randn(3, 8 * cp, 5)
    shards = [bshd_shard(x, cp, r) for r in range(cp)]
    assert all(s.shape == (3, 8, 5) for s in shards)
    assert torch.equal(bshd_unshard(shards), x)


@pytest.mark.parametrize("cp", CPS)
def test_thd_shard_then_unshard_is_identity(cp):
    cu = [0] + torch.tensor([2 * cp, 6 * cp, 4 * cp]).cumsum(0).tolist()
    x = torch.randn(cu[-1], 3)
    shards = [thd_shard(x, cu, cp, r) for r in range(cp)]
    assert sum(s.shape[0] for s in shards) == cu[-1]
    assert torch.equal(thd_unshard(shards, cu), x)


@pytest.mark.parametrize("cp", [2, 4])
def test_thd_equals_bshd_applied_to_each_sequence(cp):
    lens = [2 * cp, 6 * cp, 4 * cp]
    cu = [0] + torch.tensor(lens).cumsum(0).tolist()
    x = torch.arange(cu[-1])
    for r in range(cp):
        want = torch.cat([bshd_shard(x[None, s:e], cp, r)[0] for s, e in zip(cu[:-1], cu[1:])])
        assert torch.equal(thd_shard(x, cu, cp, r), want)


class _Group:
    """What megatron-core reads of a process group here: size() and rank()."""

    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


@pytest.fixture(scope="module")
def one_process_world(tmp_path_factory):
    init = f"file://{tmp_path_factory.mktemp('pg')}/store"
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("cp", [2, 4])
def test_bshd_shard_matches_megatron_core_get_batch_on_this_cp_rank(one_process_world, cp,
                                                                    monkeypatch):
    import inspect

    from megatron.core.utils import get_batch_on_this_cp_rank

    # 0.19 added a required ``is_hybrid_cp`` (False: Megatron's plain zigzag layout)
    extra = {"is_hybrid_cp": False} if "is_hybrid_cp" in inspect.signature(
        get_batch_on_this_cp_rank).parameters else {}
    # 0.19 asks torch.distributed for the group's size and rank (0.16 asks the group)
    for fn in ("get_world_size", "get_rank"):
        real = getattr(dist, fn)
        monkeypatch.setattr(dist, fn, lambda g=None, real=real, fn=fn: (
            (g.size() if fn == "get_world_size" else g.rank()) if isinstance(g, _Group) else real(g)))
    B, S = 2, 8 * cp
    batch = {"tokens": torch.randint(0, 100, (B, S)), "labels": torch.randint(0, 100, (B, S)),
             "loss_mask": torch.rand(B, S), "position_ids": torch.arange(S).expand(B, S),
             "attention_mask": torch.rand(B, 1, S, S) > 0.5}
    for r in range(cp):
        theirs = get_batch_on_this_cp_rank(dict(batch), cp_group=_Group(cp, r), **extra)
        for k, v in batch.items():
            dim = 2 if k == "attention_mask" else 1
            assert torch.equal(bshd_shard(v, cp, r, dim=dim), theirs[k]), (k, r)


def test_shift_left_moves_labels_within_each_sequence():
    t = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert shift_left(t, dim=1).tolist() == [[2, 3, 4, 0], [6, 7, 8, 0]]
    packed = torch.tensor([1, 2, 3, 4, 5, 6])
    assert shift_left(packed, dim=0, cu_seqlens_padded=[0, 4, 6], fill=-100).tolist() == \
        [2, 3, 4, -100, 6, -100]


def test_unpadded_lengths_fail_with_the_fix():
    with pytest.raises(ValueError, match=r"not a multiple of 2\*cp = 4; pad each sequence"):
        bshd_shard(torch.zeros(1, 6), 2, 0)
    with pytest.raises(ValueError, match="padded sequence length"):
        CPShard.thd([0, 4, 10], 2, 0)
    with pytest.raises(ValueError, match="cp_rank 2 is outside"):
        chunk_ids(2, 2)


@pytest.mark.parametrize("cp", CPS)
def test_bshd_view_positions_are_the_global_positions(cp):
    S = 4 * cp
    pos = torch.arange(S).expand(3, S)
    for r in range(cp):
        shard = CPShard.bshd(3, S, cp, r)
        assert torch.equal(shard.to_view(bshd_shard(pos, cp, r)), shard.positions)
        assert not shard.positions_aligned   # until the caller vouches for its actions


@pytest.mark.parametrize("cp", CPS)
def test_thd_view_round_trips_and_knows_global_positions(cp):
    lens = [2 * cp, 6 * cp, 4 * cp]
    cu = [0] + torch.tensor(lens).cumsum(0).tolist()
    pos = torch.cat([torch.arange(n) for n in lens])
    for r in range(cp):
        shard = CPShard.thd(cu, cp, r)
        local = thd_shard(pos, cu, cp, r)
        view = shard.to_view(local)
        assert view.shape == (3, 2 * max(lens) // (2 * cp))
        assert torch.equal(view[shard.valid], shard.positions[shard.valid])
        assert torch.equal(view[~shard.valid], torch.zeros_like(view[~shard.valid]))
        assert torch.equal(shard.from_view(view), local)


def test_thd_group_alignment_is_detected_from_host_lengths():
    kw = dict(actions_aligned=True)
    assert CPShard.thd([0, 8, 16, 20], 2, 0, group_of_seq=[0, 0, 1], **kw).positions_aligned
    assert not CPShard.thd([0, 8, 12, 20], 2, 0, group_of_seq=[0, 0, 1], **kw).positions_aligned
    assert not CPShard.thd([0, 8, 16], 2, 0, **kw).positions_aligned  # groups unknown: ragged
    # multi-turn actions (not one run from one start) never take the by-column shortcut
    assert not CPShard.thd([0, 8, 16, 20], 2, 0, group_of_seq=[0, 0, 1]).positions_aligned
    assert not CPShard.bshd(3, 8, 2, 0).positions_aligned
    assert CPShard.bshd(3, 8, 2, 0, **kw).positions_aligned


def test_actions_share_columns_only_for_single_turn_groups():
    from megatron_rl.train.batches import actions_share_columns

    m = lambda *bits: torch.tensor(bits, dtype=torch.float32)
    assert actions_share_columns([m(0, 0, 1, 1, 1), m(0, 0, 1, 1, 0), m(0, 1, 1, 0, 0)], [0, 0, 1])
    assert not actions_share_columns([m(0, 0, 1, 0, 1), m(0, 0, 1, 1, 0)], [0, 0])  # a tool token
    assert not actions_share_columns([m(0, 0, 1, 1, 0), m(0, 1, 1, 0, 0)], [0, 0])  # two starts
    assert actions_share_columns([m(0, 0, 1, 1, 0), m(0, 0, 0, 0, 0)], [0, 0])      # empty response


def test_actions_share_columns_and_padded_stacking_equal_a_per_sequence_loop():
    """The vectorised checks against the loop they replace, on random ragged masks."""
    from megatron_rl.train.batches import _pad, _stack_padded, actions_share_columns

    def by_loop(masks, groups):
        start = {}
        for m, g in zip(masks, groups):
            where = torch.nonzero(m > 0).flatten()
            if where.numel() == 0:
                continue
            first, last = int(where[0]), int(where[-1])
            if last - first + 1 != where.numel() or start.setdefault(g, first) != first:
                return False
        return True

    g = torch.Generator().manual_seed(0)
    outcomes = set()
    for trial in range(300):
        n = int(torch.randint(1, 7, (1,), generator=g))
        groups = torch.randint(0, 3, (n,), generator=g).tolist()
        masks = []
        for _ in range(n):
            length = int(torch.randint(1, 9, (1,), generator=g))
            start, run = (int(torch.randint(0, length, (1,), generator=g)) for _ in range(2))
            m = torch.zeros(length)
            m[start:start + run] = 1.0
            if trial % 3 == 0 and length > 2:   # a hole: multi-turn
                m[int(torch.randint(0, length, (1,), generator=g))] = 0.0
            masks.append(m)
        want = by_loop(masks, groups)
        outcomes.add(want)
        assert actions_share_columns(masks, groups) == want, (masks, groups)
        width = max(m.shape[0] for m in masks) + trial % 2
        assert torch.equal(_stack_padded(masks, width), torch.stack([_pad(m, width) for m in masks]))
    assert outcomes == {True, False}


@pytest.mark.parametrize("tp,cp,dp", [(2, 2, 2), (1, 4, 2), (2, 1, 4), (2, 4, 1)])
def test_group_rank_lists_match_megatron_core_rank_generator(tp, cp, dp):
    from megatron.core.parallel_state import RankGenerator

    from megatron_rl.parallel.groups import layout_ranks

    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=1, cp=cp, order="tp-cp-ep-dp-pp")
    ours = layout_ranks(tp, cp, dp)
    for kind, token in (("tp", "tp"), ("cp", "cp"), ("dp", "dp"), ("dp_cp", "dp-cp")):
        assert sorted(map(list, ours[kind])) == sorted(gen.get_ranks(token)), kind


@pytest.mark.parametrize("cp", [2, 4])
def test_group_aligned_packing_keeps_position_statistics_local(cp):
    """Future-KL under CP: a packed micro-batch whose groups share a padded length needs no
    per-position all-reduce (the shard sees it); ragged lengths do."""
    from megatron_rl.train.batches import build_micro_batch, packed_lengths

    lens, groups = [5, 11, 3, 9, 9, 2], [0, 0, 0, 1, 1, 1]
    aligned = packed_lengths(lens, groups, cp, align_groups=True)
    assert aligned == [padded_length(11, cp)] * 3 + [padded_length(9, cp)] * 3
    assert packed_lengths(lens, groups, cp, align_groups=False) == [padded_length(n, cp) for n in lens]
    assert packed_lengths(lens, groups, 1, align_groups=True) == [padded_length(n, 1) for n in lens]
    # sequence parallelism splits each CP rank's share over TP: a multiple of 2 x CP x TP
    assert packed_lengths([5, 17], [0, 0], cp, False, tp_size=4) == [8 * cp * -(-5 // (8 * cp)),
                                                                      8 * cp * -(-17 // (8 * cp))]
    seqs = [{"tokens": torch.arange(n), "loss_mask": (torch.arange(n) >= 1).float(),
             "old_logprobs": torch.zeros(n), "advantages": torch.zeros(n)} for n in lens]
    gid = torch.tensor(groups)
    for align, expect in ((True, True), (False, False)):
        mb = build_micro_batch(seqs, gid, packed=True, cp_size=cp, cp_rank=cp - 1, align_groups=align)
        assert mb.shard.shard.positions_aligned is expect
