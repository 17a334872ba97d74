"""One PPO step (policy + critic, GAE with a KL reward and step-wide whitening) under each
parallel layout gives one process's gradients of both models."""

import pytest

from tests.distributed.harness import spawn

# (name, layout, micro-batches per rank, THD packing, routing replay)
CASES_2 = [("tp2", {"tp": 2}, 1, False, False), ("pp2", {"pp": 2}, 2, False, False),
           ("cp2", {"cp": 2}, 1, False, False), ("cp2_thd", {"cp": 2}, 1, True, False),
           ("dp2", {}, 2, False, False), ("ep2", {"ep": 2}, 1, False, False),
           # the policy replays its recorded routes; the critic's routers stay its own
           ("ep2_routing_replay", {"ep": 2}, 1, False, True)]


@pytest.fixture(scope="module")
def ppo_results(tmp_path_factory):
    from tests.distributed import ppo_workers

    return spawn(ppo_workers.ppo_step_equivalence, 2, str(tmp_path_factory.mktemp("ppo")), CASES_2)


@pytest.mark.parametrize("case", [c[0] for c in CASES_2])
def test_ppo_step_gradients_of_policy_and_critic_equal_single_process(ppo_results, case):
    r = ppo_results[case]
    assert r["grad"] < 1e-4, f"{r['worst_param']} gradient differs by {r['grad']:.2e} (relative)"
    assert r["critic_metrics"]["critic/skipped_updates"] == 0.0
