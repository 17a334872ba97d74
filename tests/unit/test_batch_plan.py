"""Token-budget planning (``train.batch_plan``): DP shares of equal group counts balanced by
tokens (near the brute-force optimum), micro-batches within the budget and equal in number on
every rank, every group exactly once, and a cost equal to what the batch builder lays out."""

import itertools
import random

import pytest
import torch

from megatron_rl.train.batch_plan import (balanced_partition, fixed_plan, micro_batch_cost,
                                          pack_groups, plan_step)
from megatron_rl.train.batches import build_micro_batch


def _best_max_sum(weights, parts):
    """Brute force: the smallest largest part over every equal-size partition into two."""
    n = len(weights)
    best = None
    for first in itertools.combinations(range(n), n // parts):
        a = sum(weights[i] for i in first)
        worst = max(a, sum(weights) - a)
        best = worst if best is None else min(best, worst)
    return best


def test_balanced_partition_is_near_the_brute_force_optimum_and_far_from_contiguous():
    rng = random.Random(0)
    gaps, contiguous_gaps = [], []
    for _ in range(30):
        w = [rng.randint(64, 4096) for _ in range(10)]
        parts = balanced_partition(w, 2)
        assert sorted(i for p in parts for i in p) == list(range(10))
        assert [len(p) for p in parts] == [5, 5]
        best = _best_max_sum(w, 2)
        gaps.append(max(sum(w[i] for i in p) for p in parts) / best - 1)
        contiguous_gaps.append(max(sum(w[:5]), sum(w[5:])) / best - 1)
    assert max(gaps) < 0.05 and sum(gaps) / len(gaps) < 0.01, gaps
    assert sum(contiguous_gaps) > 10 * sum(gaps), (contiguous_gaps, gaps)


def test_balanced_partition_is_deterministic_and_refuses_unequal_counts():
    w = [5, 5, 5, 5, 1, 9]
    assert balanced_partition(w, 3) == balanced_partition(list(w), 3)
    with pytest.raises(ValueError, match="equal parts"):
        balanced_partition([1, 2, 3], 2)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("dp,budget", [(1, 200), (2, 150), (4, 90), (2, 40)])
def test_plan_covers_every_group_once_in_equal_counts_within_the_budget(packed, dp, budget):
    rng = random.Random(dp * budget)
    lengths = [[rng.randint(10, 70) for _ in range(2)] for _ in range(16)]
    cost = micro_batch_cost(lengths, packed=packed, cp_size=2, align_groups=False)
    plan = plan_step(range(16), [sum(x) for x in lengths], dp, budget, cost)
    assert sorted(g for r in plan.ranks for mb in r for g in mb) == list(range(16))
    assert len({len(r) for r in plan.ranks}) == 1                 # same micro-batch count
    assert len({sum(len(mb) for mb in r) for r in plan.ranks}) == 1   # same group count
    over = 0
    for r in plan.ranks:
        for mb in r:
            assert cost(mb) <= budget or len(mb) == 1, (mb, cost(mb))
            over += cost(mb) > budget
    assert plan.over_budget == over
    m = plan.metrics()
    assert m["batch/micro_batches"] == len(plan.ranks[0])
    assert 0.0 <= m["batch/pad_frac"] < 1.0 and m["batch/dp_token_imbalance"] >= 0.0


def test_metrics_are_the_padding_share_and_the_busiest_rank_over_the_mean():
    lengths = [[10, 30], [20, 20], [6, 6], [40, 40]]   # even: CP 1 pads to a multiple of 2
    cost = micro_batch_cost(lengths, packed=False, cp_size=1, align_groups=False)
    plan = fixed_plan(lengths, 2, 1, cost)       # ranks: groups {0, 1} and {2, 3}
    m = plan.metrics()
    real, laid = 10 + 30 + 20 + 20 + 6 + 6 + 40 + 40, 60 + 40 + 12 + 80
    assert m["batch/pad_frac"] == pytest.approx(1 - real / laid)
    assert m["batch/dp_token_imbalance"] == pytest.approx(92 / 86 - 1)   # ranks: 80 and 92
    assert m["batch/micro_batches"] == 2


def test_first_fit_decreasing_keeps_a_group_over_the_budget_alone():
    lengths = [[100], [10], [10], [10]]
    cost = micro_batch_cost(lengths, packed=True, cp_size=1, align_groups=False)
    bins = pack_groups(range(4), [100, 10, 10, 10], cost, 25)
    assert [0] in bins and sorted(map(len, bins)) == [1, 1, 2]


@pytest.mark.parametrize("packed,align", [(True, False), (True, True), (False, False)])
def test_cost_is_what_the_batch_builder_lays_out(packed, align):
    lengths = [[7, 19, 12], [33, 3, 8]]
    gid = torch.tensor([0, 0, 0, 1, 1, 1])
    seqs = [{"tokens": torch.zeros(n, dtype=torch.long), "loss_mask": torch.ones(n),
             "old_logprobs": torch.zeros(n), "advantages": torch.zeros(n)}
            for ls in lengths for n in ls]
    for cp in (1, 2, 4):
        laid = 0
        for r in range(cp):
            mb = build_micro_batch(seqs, gid, packed=packed, cp_size=cp, cp_rank=r,
                                   align_groups=align, num_groups=2)
            laid += mb.tokens.numel()
        cost = micro_batch_cost(lengths, packed=packed, cp_size=cp, align_groups=align)
        assert cost([0, 1]) == laid, (cp, cost([0, 1]), laid)


def test_first_fit_decreasing_packs_to_the_lower_bound_on_a_known_case():
    lengths = [[n] for n in (7, 3, 12, 5, 5, 9, 1, 16, 2)]   # padded to multiples of 4 at CP 2
    cost = micro_batch_cost(lengths, packed=True, cp_size=2, align_groups=False)
    bins = pack_groups(range(9), [n for [n] in lengths], cost, 16)
    assert sorted(g for b in bins for g in b) == list(range(9))
    assert all(cost(b) <= 16 for b in bins)
    assert len(bins) == 5  # 76 padded tokens need at least 5 bins of 16: FFD reaches the bound
