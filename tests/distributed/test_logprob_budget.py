"""The forward-only passes over merged micro-batches (``train.logprob_max_tokens_per_micro_batch``)
give each training micro-batch what its own pass gives: old and reference log-probs, the
measured trainer log-probs, the critic's values and R2's recorded routes (exactly), so the step's
gradient is unchanged, in every layout, with the routes crossing TP where its sequence-parallel
split moves them."""

import pytest

from tests.distributed.harness import spawn

TOL = 2e-5   # fp32: a longer packed stream changes GEMM blocking, not the math

# name, layout, routing_replay, reference KL, log-prob budget (tokens as laid out), critic (gae)
CASES_2 = [
    ("dp2_r2_ref", {}, "old", True, 10_000, False),
    ("tp2_r2", {"tp": 2}, "old", False, 10_000, False),
    ("tp2_r3_ref", {"tp": 2}, "rollout", True, 160, False),
    ("cp2_r3", {"cp": 2}, "rollout", False, 10_000, False),
    ("pp2_r2_ref", {"pp": 2}, "old", True, 10_000, False),
    ("ep2_live_ref", {"ep": 2}, "off", True, 200, False),
    ("dp2_critic_r2", {}, "old", False, 10_000, True),
    ("tp2_critic_ref", {"tp": 2}, "off", True, 160, True),
]
CASES_4 = [
    ("tp2_cp2_r2_ref", {"tp": 2, "cp": 2}, "old", True, 10_000, False),
    ("tp2_ep2_r3", {"tp": 2, "ep": 2}, "rollout", False, 10_000, False),
]


@pytest.fixture(scope="module")
def results():
    from tests.distributed import logprob_budget_workers as w

    out = spawn(w.logprob_budget_equivalence, 2, CASES_2)
    out.update(spawn(w.logprob_budget_equivalence, 4, CASES_4))
    return out


@pytest.mark.parametrize("case", [c[0] for c in CASES_2 + CASES_4])
def test_merged_passes_give_each_micro_batch_its_own_results(results, case):
    r = results[case]
    fixed, merged = r["passes"]
    assert merged < fixed, f"the budget merged nothing ({fixed} micro-batches, {merged} passes)"
    assert r["had_old"] and r["old"] <= TOL, f"old log-probs differ by {r['old']:.2e}"
    assert r["measured"] <= TOL, f"measured trainer log-probs differ by {r['measured']:.2e}"
    if dict((c[0], c[3]) for c in CASES_2 + CASES_4)[case]:
        assert r["had_ref"] and r["ref"] <= TOL, f"reference log-probs differ by {r['ref']:.2e}"
    if "_r2" in case or "_r3" in case:
        assert r["had_routes"] and not r["routes_differ"]
    if "critic" in case:
        assert r["had_values"] and r["values"] <= TOL, f"critic values differ by {r['values']:.2e}"


@pytest.mark.parametrize("case", [c[0] for c in CASES_2 + CASES_4])
def test_merged_passes_leave_the_step_gradient_unchanged(results, case):
    r = results[case]
    assert r["grad_scale"] > 0
    assert r["grad"] <= TOL * max(1.0, r["grad_scale"]), f"gradient differs by {r['grad']:.2e}"
