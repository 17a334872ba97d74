"""R3: the engine's expert routes replayed in Megatron give one process's gradients in every
layout, the replay hook forces only the discrete choice, and the two ways of getting it wrong
(no replay; routes one token off) are caught."""

import pytest

from tests.distributed.conftest import ROUTE_CASES

TOL = 2e-5   # fp32: TP / CP change summation order


@pytest.mark.parametrize("case", [c[0] for c in ROUTE_CASES if c[5] is None])
def test_replayed_routes_give_single_process_gradients(route_results, case):
    r = route_results[case]
    assert r["loss"] <= TOL, f"loss differs by {r['loss']:.2e}"
    assert r["grad"] <= TOL, f"{r['worst_param']} gradient differs by {r['grad']:.2e}"


@pytest.mark.parametrize("case", [c[0] for c in ROUTE_CASES if c[5] is not None])
def test_dropping_or_shifting_the_routes_changes_the_gradients(route_results, case):
    # the engine's routes differ from the live router's on most tokens: the reference would
    # not be matched by a layout that forgot them or put them one token off
    assert route_results[case]["grad"] > 1e-2


@pytest.mark.parametrize("model", ["qwen3_moe", "deepseek_v3", "mixtral"])
def test_a_replayed_expert_outside_the_live_top_k_gets_a_gate_and_a_gradient(route_check_results, model):
    r = route_check_results[model]
    assert r["min_gate_outside_live_topk"] > 1e-3
    assert r["min_router_grad"] > 1e-3


@pytest.mark.parametrize("model", ["qwen3_moe", "deepseek_v3", "mixtral"])
def test_replay_forces_known_routes_and_routes_the_rest_live(route_check_results, model):
    r = route_check_results[model]
    assert r["replayed_used"] and r["live_used_where_unknown"]


@pytest.mark.parametrize("model", ["qwen3_moe", "deepseek_v3", "mixtral"])
def test_route_agreement_counts_matching_slots(route_check_results, model):
    r = route_check_results[model]
    assert r["agree_all"] == 1.0 and r["agree_changed"] == pytest.approx(r["expected_changed"])


def test_routes_for_another_layout_are_refused(route_check_results):
    assert "replay routes hold 127 tokens but MoE layer" in route_check_results["qwen3_moe"]["refused"]
