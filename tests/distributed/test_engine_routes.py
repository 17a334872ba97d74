"""The engine's expert routes (recorded from vLLM's CPU runner) against Megatron's live routers,
at engine and trainer TP 1 and 2: equal for the same weights; with the engine's routers perturbed,
the routers disagree and the log-probs drift, and replaying the engine's routes (R3) makes
Megatron use exactly the engine's experts and shrinks the gap."""

import pytest

from tests.distributed.harness import spawn

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="session")
def fidelity(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed (CPU: pip install -e '.[cpu]')")
    from megatron_rl.model.tiny import write_tiny_hf_model
    from tests.distributed import engine_route_workers

    hf = tmp_path_factory.mktemp("route_hf") / "qwen3_moe"
    write_tiny_hf_model("qwen3_moe", hf, seed=3)
    return {tp: spawn(engine_route_workers.route_fidelity, tp,
                      str(tmp_path_factory.mktemp(f"routes{tp}")), str(hf), tp) for tp in (1, 2)}


@pytest.mark.parametrize("tp", [1, 2])
def test_recorded_routes_equal_megatrons_live_routes_for_the_same_weights(fidelity, tp):
    r = fidelity[tp]["same_weights"]
    assert r["agreement"] >= 0.999 and r["slots"] > 1000
    assert r["gap_max"] <= 1e-5


@pytest.mark.parametrize("tp", [1, 2])
def test_replaying_the_engines_routes_removes_their_disagreement(fidelity, tp):
    live, replayed = fidelity[tp]["perturbed_live"], fidelity[tp]["perturbed_replayed"]
    assert live["agreement"] < 0.99                     # the perturbation moved some routes
    assert replayed["replayed_equal"] == 1.0            # every known route is the engine's
    assert replayed["gap_mean"] < live["gap_mean"] / 5   # what is left: the gates' own weights


def test_the_payload_is_int16_tokens_by_moe_layers_by_top_k(fidelity):
    shape, dtype, tokens = fidelity[1]["payload"]
    assert shape == [tokens - 1, 2, 2] and dtype == "int16"
