"""The learned reward model's scores equal transformers' ``*ForSequenceClassification`` scores
(dense and MoE, 1e-5) under every parallel layout, on every rank; a broken head is refused."""

import json
import os

import pytest

from tests.distributed.harness import spawn

# name, layout, micro-batch token budget, packed (THD) or padded (BSHD)
CASES_2 = [("tp2", {"tp": 2}, 64, True), ("pp2", {"pp": 2}, 64, True),
           ("cp2", {"cp": 2}, 4096, True), ("ep2", {"ep": 2}, 64, False),
           ("dp2", {}, 48, True), ("dp2_bshd", {}, 4096, False)]


@pytest.fixture(scope="module")
def rm_results(tmp_path_factory):
    from tests.distributed import rm_workers

    tmp = str(tmp_path_factory.mktemp("rm"))
    paths = rm_workers.write_models(tmp)
    seqs = rm_workers._sequences(32)
    ref = {"paths": paths, "seqs": seqs,
           "scores": {a: rm_workers.transformers_scores(p, seqs) for a, p in paths.items()}}
    with open(os.path.join(tmp, "reference.json"), "w") as f:
        json.dump(ref, f)
    return spawn(rm_workers.rm_equivalence, 2, tmp, CASES_2)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("case", [c[0] for c in CASES_2])
def test_reward_model_scores_equal_transformers_under_each_layout(rm_results, case, arch):
    r = rm_results[f"{case}/{arch}"]
    assert r["scale"] > 1e-3, r      # a random head: the scores are not all zero
    assert r["max_diff"] < 1e-5 * max(1.0, r["scale"]), r
    assert r["ranks_agree"], "ranks got different scores"
    assert r["empty"]   # a round with nothing to score returns nothing, on every rank
