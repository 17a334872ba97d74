"""The sharded loss equals the single-process loss: values, metrics and logits gradients.

Every case of ``workers.CASES`` (the future-KL GRPO ratio kinds, GSPO, Dr.GSPO with sequence-level
TIS, GRPO with KL-in-loss, entropy bonus and token TIS, REINFORCE with clipped weights,
REINFORCE++) runs on 4 micro-batches (uneven responses, prompts of different lengths, tool tokens,
one-token responses that leave most CP ranks without an action token, a zero-variance group) in
BSHD, THD, and THD with group-aligned lengths, under each parallel layout, against the float64
reference of ``batches.reference_step``.
"""

import pytest

from tests.distributed.workers import CASES, DTYPES, FP32_PARALLEL, LAYOUTS, PARALLEL, key

TOL = {"float64": 1e-10, "float32": 1e-5}
RUNS = [(p, "float64") for p in PARALLEL] + [(p, "float32") for p in FP32_PARALLEL]


def _id(par):
    return "cp{}-tp{}-dp{}".format(*par)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("par,dtype", RUNS, ids=[f"{_id(p)}-{d}" for p, d in RUNS])
@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_sharded_loss_and_grads_equal_single_process(loss_results, case, par, dtype, layout):
    r = loss_results[key(case, layout, par, dtype)]
    tol = TOL[dtype]
    assert r["loss"] <= tol, f"loss differs by {r['loss']:.2e} (relative)"
    assert r["grad"] <= tol, f"logits gradient differs by {r['grad']:.2e} (relative to its max)"
    bad = {k: v for k, v in r["metrics"].items() if v > tol}
    assert not bad, f"metrics differ: {bad}"


def test_every_dtype_is_checked():
    assert set(d for _, d in RUNS) == set(DTYPES)


@pytest.mark.parametrize("par", [p for p in PARALLEL if p[0] > 1], ids=_id)
def test_some_cp_rank_holds_no_action_token_and_still_matches(loss_results, par):
    # the one-token-response micro-batch puts every action token in the last chunk: the other CP
    # ranks must still join every collective (a deadlock would hang the spawn) and contribute 0
    for layout in LAYOUTS:
        assert loss_results[key(CASES[0].name, layout, par, "float64")]["ranks_without_action_tokens"] > 0
