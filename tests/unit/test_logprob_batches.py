"""Merged micro-batches for the forward-only passes (``train.logprob_max_tokens_per_micro_batch``):
the plan covers each rank's training micro-batches once, in as few passes as fit the budget and
the same count on every rank; a concatenation of packed micro-batches is the micro-batch the
builder makes of their sequences; per-token results cut back equal each part's own; and the
config refuses what the merge cannot honour."""

import random

import pytest
import torch

from megatron_rl.fields import ConfigError
from megatron_rl.parallel.groups import ParallelGroups
from megatron_rl.train.batch_plan import merged_passes, pack_groups
from megatron_rl.train.batches import build_micro_batch, concat_micro_batches
from megatron_rl.train.logprob_batches import merged_pass
from tests.unit.test_config import RECIPES


@pytest.mark.parametrize("seed", range(20))
def test_merge_plan_covers_each_micro_batch_once_in_equal_counts_within_the_budget(seed):
    rng = random.Random(seed)
    dp, n, budget = rng.choice([1, 2, 4]), rng.randint(1, 9), rng.choice([64, 200, 1000])
    costs = [[rng.randint(8, 150) for _ in range(n)] for _ in range(dp)]
    plan = merged_passes(costs, budget)
    count = len(plan[0])
    assert all(len(r) == count for r in plan)
    fewest = max(len(pack_groups(range(n), c, lambda b, c=c: sum(c[i] for i in b), budget))
                 for c in costs)
    assert count == fewest            # no more passes than the fullest rank needs
    for r, c in zip(plan, costs):
        assert sorted(i for b in r for i in b) == list(range(n))
        assert all(len(b) == 1 or sum(c[i] for i in b) <= budget for b in r)
        assert r == sorted(r) and all(b == sorted(b) for b in r)
    assert merged_passes(costs, budget) == plan                     # deterministic


def test_merge_plan_merges_whole_micro_batches_on_a_known_case():
    # rank 0 fits 3+2 into one pass of 6 and 5 alone; rank 1 needs three passes of its 4,4,4:
    # rank 0 is split back to three so the ranks' schedules meet
    assert merged_passes([[3, 5, 2], [4, 4, 4]], 6) == [[[0], [1], [2]], [[0], [1], [2]]]
    assert merged_passes([[3, 5, 2], [4, 1, 4]], 6) == [[[0, 2], [1]], [[0, 1], [2]]]


def _sequences(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, 50, (n,), generator=g),
             "loss_mask": (torch.rand(n, generator=g) > 0.3).float(),
             "old_logprobs": torch.zeros(n), "advantages": torch.zeros(n)} for n in lengths]


PARTS = [[7, 19, 12], [33, 3], [5, 8, 1, 21]]   # three micro-batches: groups of 1-2 sequences
GIDS = [[0, 0, 1], [0, 0], [0, 1, 1, 2]]


@pytest.mark.parametrize("cp,cp_rank", [(1, 0), (2, 0), (2, 1), (4, 3)])
def test_concatenated_packed_micro_batches_equal_the_builders_micro_batch_of_their_sequences(cp, cp_rank):
    seqs = _sequences([n for p in PARTS for n in p])
    cut = [0, 3, 5, 9]
    kw = dict(packed=True, cp_size=cp, cp_rank=cp_rank)
    parts = [build_micro_batch(seqs[a:b], torch.tensor(g), num_groups=max(g) + 1, **kw)
             for a, b, g in zip(cut[:-1], cut[1:], GIDS)]
    offsets = [0, 2, 3]
    whole_gid = torch.tensor([o + x for o, g in zip(offsets, GIDS) for x in g])
    ref = build_micro_batch(seqs, whole_gid, num_groups=6, **kw)
    got = concat_micro_batches(parts, None)
    for k in ("tokens", "position_ids", "labels"):
        assert torch.equal(getattr(got, k), getattr(ref, k)), k
    assert got.packed_seq_params.host_cu_seqlens == ref.packed_seq_params.host_cu_seqlens
    assert torch.equal(got.packed_seq_params.cu_seqlens_q, ref.packed_seq_params.cu_seqlens_q)
    assert got.packed_seq_params.max_seqlen_q == ref.packed_seq_params.max_seqlen_q
    assert torch.equal(got.shard.mask, ref.shard.mask)
    assert torch.equal(got.shard.group_ids, ref.shard.group_ids)
    assert got.shard.ops.num_groups == 6


def test_results_cut_back_equal_each_parts_own_pass():
    seqs = _sequences([n for p in PARTS for n in p], seed=1)
    cut = [0, 3, 5, 9]
    parts = [build_micro_batch(seqs[a:b], torch.tensor(g), packed=True, cp_size=2, cp_rank=1,
                               num_groups=max(g) + 1) for a, b, g in zip(cut[:-1], cut[1:], GIDS)]

    def per_token(mbs):      # a forward-only pass: any function of each token and its position
        return [mb.shard.view((mb.labels[0] * 1000 + mb.position_ids[0]).float()) for mb in mbs]

    own = per_token(parts)
    got = merged_pass(per_token, parts, [[0, 2], [1]], ParallelGroups())
    assert len(got) == 3
    for a, b in zip(own, got):
        assert a.shape == b.shape and torch.equal(a, b)
    assert merged_pass(lambda mbs: [], parts, [[0, 1, 2]], ParallelGroups()) == []  # not last stage


def test_padded_micro_batches_are_refused():
    seqs = _sequences([4, 6])
    mb = build_micro_batch(seqs, torch.tensor([0, 0]), packed=False)
    with pytest.raises(ValueError, match="only packed"):
        concat_micro_batches([mb, mb], None)


@pytest.mark.parametrize("overrides,needle", [
    (["train.logprob_max_tokens_per_micro_batch=4096"], "needs packed sequences .* set "
                                                        "train.pack_sequences=true"),
    (["train.pack_sequences=true", "train.max_tokens_per_micro_batch=2048",
      "train.logprob_max_tokens_per_micro_batch=1024"], "1024 is below "
                                                        "train.max_tokens_per_micro_batch=2048"),
])
def test_a_logprob_budget_the_merge_cannot_honour_is_refused(overrides, needle):
    from megatron_rl.config import load_config

    with pytest.raises(ConfigError, match=needle):
        load_config(RECIPES / "tiny_moe_gspo.yaml", overrides)
    load_config(RECIPES / "tiny_moe_gspo.yaml", ["train.pack_sequences=true",
                                                 "train.logprob_max_tokens_per_micro_batch=4096"])


@pytest.mark.parametrize("recipe,warned", [("tiny_moe_gspo", True),              # no pass runs
                                           ("tiny_moe_future_kl_grpo", False),   # reference pass
                                           ("tiny_moe_r3", False)])              # old pass
def test_a_logprob_budget_with_no_forward_only_pass_is_warned_about(recipe, warned):
    from megatron_rl.config import load_config
    from megatron_rl.train import setup as S

    cfg = load_config(RECIPES / f"{recipe}.yaml", ["train.pack_sequences=true",
                                                   "train.logprob_max_tokens_per_micro_batch=8192"])
    plan = S.step_plan(cfg, S.needs_reference(cfg))
    got = S.plan_warnings(cfg, plan, critic=False)
    assert bool(got) == warned, got
    if warned:
        assert "train.logprob_max_tokens_per_micro_batch=8192 has no effect" in got[0]
    cfg = load_config(RECIPES / f"{recipe}.yaml")
    assert S.plan_warnings(cfg, S.step_plan(cfg, S.needs_reference(cfg)), critic=False) == []
