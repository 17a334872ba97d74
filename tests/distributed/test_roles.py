"""Separate placement's process groups at world 3 (one engine rank, two trainer ranks): each role
has a default group of its own, and versioned weights and batches cross the bridges exactly."""

import pytest

from megatron_rl.parallel.roles import role_of
from tests.distributed import roles_workers
from tests.distributed.harness import spawn


@pytest.fixture(scope="module")
def split():
    return spawn(roles_workers.split_and_stream, 3, 3)


def test_each_role_has_a_default_group_of_its_own(split):
    engine, trainer = split, split["trainer0"]
    assert (engine["role"], engine["role_rank"], engine["default_world"]) == ("engine", 0, 1)
    assert engine["role_sum"] == 0.0   # trainer ranks 1 and 2 did not join this all-reduce
    assert (trainer["role"], trainer["role_rank"], trainer["default_world"]) == ("trainer", 0, 2)
    assert trainer["role_sum"] == 3.0  # global ranks 1 + 2, and not the engine's


def test_three_versions_cross_bit_exactly_then_stop(split):
    engine = split
    assert [v["version"] for v in engine["versions"]] == [0, 1, 2]
    assert all(v["exact"] for v in engine["versions"])
    assert engine["exit_code"] == 75   # the trainer's exit status reaches the engine ranks
    assert engine["versions"][0]["names"] == ["a.weight", "b.bias", "c.big", "d.ids"]
    buckets, sent_bytes = engine["trainer0"]["sent"][0]
    assert buckets == 3 and sent_bytes == 4 * 3 * 4 + 7 * 2 + 64 * 64 * 8 + 5 * 8


def test_batches_cross_in_order(split):
    assert split["trainer0"]["batches"] == [{"step": v, "payload": list(range(v + 3))}
                                            for v in range(3)]


def test_split_is_refused_without_an_engine_or_a_trainer():
    assert role_of(2, 3, 1) == ("trainer", 1, 2)
    for bad in (0, 3):
        with pytest.raises(ValueError, match="rollout.engine_ranks"):
            role_of(0, 3, bad)


TOL = 1e-4        # fp32 engine vs fp32 Megatron on the same weights (test_rollout_sync's bound)
STALE_MIN = 1e-2  # each update must visibly change the log-probs


@pytest.fixture(scope="module")
def refits(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed (CPU: pip install -e '.[cpu]')")
    from megatron_rl.model.tiny import write_tiny_hf_model

    hf = tmp_path_factory.mktemp("refit_hf") / "qwen3_moe"
    write_tiny_hf_model("qwen3_moe", hf, seed=3)
    return {tp: spawn(roles_workers.stream_refits, 3, str(tmp_path_factory.mktemp(f"r{tp}")),
                      str(hf), 3, tp) for tp in (1, 2)}


@pytest.mark.parametrize("tp", [1, 2])
def test_three_refits_in_a_row_each_make_the_engine_equal_the_trainer(refits, tp):
    r = refits[tp]
    assert [a["version"] for a in r["applied"]] == [0, 1, 2]
    assert all(a["tensors"] == 45 and a["repacked"] == 2 for a in r["applied"])
    for row in r["trainer"]:
        assert row["fresh"] <= TOL, row      # after the refit: the trainer's own log-probs
        assert row["stale"] >= STALE_MIN, row  # before it: the previous version's, visibly off
