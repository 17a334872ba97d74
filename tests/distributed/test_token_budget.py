"""Token-budget micro-batches change how a step is cut, never its gradient: through the trainer's
own batch path, the DP-reduced gradient of every loss and aggregation with groups balanced over
DP by tokens and packed under a budget equals the fixed-count path's, BSHD and THD, at DP 2 and
with two updates at DP 1 (where both paths put the same groups in each update)."""

import pytest

from tests.distributed.budget_workers import budget_equivalence
from tests.distributed.harness import spawn

CLIP = {"eps_low": 0.2, "eps_high": 0.2}
DP2_CASES = [
    ("grpo_token_mean_bshd", "grpo", dict(CLIP, agg="token-mean"), False, 1, 96, 1),
    ("grpo_seq_mean_token_mean_thd", "grpo", dict(CLIP, agg="seq-mean-token-mean"), True, 1, 96, 2),
    ("grpo_seq_mean_token_sum_thd", "grpo", dict(CLIP, agg="seq-mean-token-sum"), True, 1, 64, 1),
    ("gspo_bshd", "gspo", {}, False, 1, 128, 2),
    ("future_kl_grpo_thd", "future_kl_grpo", {}, True, 1, 96, 1),
    ("reinforce_seq_ratio_thd", "reinforce", {"ratio": "sequence"}, True, 1, 80, 1),
    # each rank normalising by its own tokens instead of the step's: must be caught
    ("mutant_local_denominators", "grpo", dict(CLIP, agg="token-mean"), True, 1, 96, 1),
]
DP1_CASES = [("gspo_two_updates_thd", "gspo", {}, True, 2, 96, 1),
             ("grpo_two_updates_bshd", "grpo", dict(CLIP), False, 2, 128, 2)]
TOL = 2e-6   # relative to the largest gradient entry: fp32, another summation order


@pytest.fixture(scope="module")
def dp2():
    return spawn(budget_equivalence, 2, DP2_CASES)


@pytest.fixture(scope="module")
def dp1():
    return spawn(budget_equivalence, 1, DP1_CASES)


def _check(r):
    assert r["grad_scale"] > 0, r
    assert r["grad_diff"] <= TOL * r["grad_scale"], r
    a, b = r["loss"]
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), r


@pytest.mark.parametrize("case", [c[0] for c in DP2_CASES if not c[0].startswith("mutant")])
def test_token_budget_gradient_equals_the_fixed_count_path_at_dp2(dp2, case):
    r = dp2[case]
    _check(r)
    m = r["metrics"]
    # the budget cut differently, balanced better and padded no more than the fixed path
    assert r["micro_batches"][0] != r["micro_batches"][1] or m != r["fixed_metrics"], r
    assert m["batch/dp_token_imbalance"] <= r["fixed_metrics"]["batch/dp_token_imbalance"], r
    assert m["batch/micro_batches"] == r["micro_batches"][1], r


@pytest.mark.parametrize("case", [c[0] for c in DP1_CASES])
def test_token_budget_gradient_of_each_update_equals_the_fixed_count_path(dp1, case):
    _check(dp1[case])


def test_a_per_rank_normaliser_is_caught(dp2):
    r = dp2["mutant_local_denominators"]
    assert r["grad_diff"] > 100 * TOL * r["grad_scale"], r
