"""The critic's value loss and gradients under each parallel layout equal one process's."""

import pytest

from tests.distributed.harness import spawn

CASES_2 = [("tp2", {"tp": 2}, 1), ("pp2", {"pp": 2}, 2), ("cp2", {"cp": 2}, 1),
           ("dp2", {}, 2), ("ep2", {"ep": 2}, 1)]


@pytest.fixture(scope="module")
def critic_results(tmp_path_factory):
    from tests.distributed import critic_workers

    return spawn(critic_workers.critic_equivalence, 2, str(tmp_path_factory.mktemp("critic")),
                 CASES_2)


@pytest.mark.parametrize("case", [c[0] for c in CASES_2])
def test_critic_loss_and_gradients_equal_single_process(critic_results, case):
    r = critic_results[case]
    assert r["clip_frac"] > 0 and r["trunk_grad"] > 0     # the value clip binds; the trunk learns
    assert r["loss"] < 1e-5, f"value loss differs by {r['loss']:.2e} (relative)"
    assert r["grad"] < 1e-4, f"{r['worst_param']} gradient differs by {r['grad']:.2e}"


def test_critic_exports_as_a_token_classifier_transformers_loads_with_the_same_values(tmp_path):
    from tests.distributed import critic_workers

    r = spawn(critic_workers.critic_export, 2, str(tmp_path))
    assert r["architecture"] == "Qwen3MoeForTokenClassification" and r["num_labels"] == 1
    assert r["max_diff"] < 1e-5 * max(1.0, r["scale"]), r
