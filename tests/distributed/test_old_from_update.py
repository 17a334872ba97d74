"""With one update per step and nothing reading the old log-probs before it, the trainer takes
them from the update's own forward instead of a separate pass (``StepPlan.old_from_update``).
The update runs the rollout's policy, so the step must come out the same as with the pass:
weights after the update, every metric (loss, clip fractions, approximate KL, train/inference
mismatch), the expert-load counts and the old log-probs themselves, under each layout."""

import pytest

from tests.distributed.harness import spawn

# (name, layout, micro-batches per rank, THD packing); the batch is two groups of four
CASES = [("tp2", {"tp": 2}, 2, False), ("pp2", {"pp": 2}, 2, False), ("cp2", {"cp": 2}, 1, False),
         ("cp2_thd", {"cp": 2}, 1, True), ("dp2", {}, 1, False), ("ep2", {"ep": 2}, 1, False)]


@pytest.fixture(scope="module")
def results():
    from tests.distributed import old_pass_workers

    return spawn(old_pass_workers.old_from_update_equivalence, 2, CASES)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_old_logprobs_from_the_update_give_the_step_of_a_separate_pass(results, case):
    r = results[case]
    assert r["checked"], r                  # some rank held log-probs and expert counts
    assert r["update_moved_weights"] > 1e-4, r
    assert not r["router_or_stage_differs"], r
    assert "mismatch/abs_sum" in r["metric_keys"] or case == "pp2", r
    assert r["params"] <= 1e-6 and r["metrics"] <= 1e-6 and r["old_logprobs"] <= 1e-6, r
