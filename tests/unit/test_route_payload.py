"""The route payload's contract (``rollout.routes``): checked on arrival with one line naming the
response and the layer, narrowed from vLLM's own output, merged across the turns of an episode,
and laid out for training in token coordinates (-1 where the engine has none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_rl.rollout.engine import Sample
from megatron_rl.rollout.multiturn import Episode
from megatron_rl.rollout.routes import RouteSpec, check_routes, native_routes, request_key
from megatron_rl.train.rl_batch import group_sequences

SPEC = RouteSpec(layers=(1, 2), num_experts=4, top_k=2, num_layers=3)


def _routes(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(4)[:2] for _ in range(n * 2)]).reshape(n, 2, 2).astype(np.int16)


def test_a_valid_payload_passes_as_int16():
    out = check_routes(_routes(9).astype(np.int64), 10, SPEC, "prompt 0 sample 1")
    assert out.dtype == np.int16 and out.shape == (9, 2, 2)


@pytest.mark.parametrize("mutate,needle", [
    (lambda r: r[:-2], "prompt 3 sample 1: 7 tokens for a sequence of 10"),
    (lambda r: r[:, :1], "shape (9, 1, 2), expected [tokens, 2 MoE layers, top-k 2]"),
    (lambda r: np.where(np.arange(9)[:, None, None] == 4, 7, r), "MoE layer 1, token 4: expert id 7 outside [0, 4)"),
    (lambda r: np.concatenate([r[:, :1], np.full((9, 1, 2), 3, np.int16)], 1),
     "MoE layer 2, token 0: expert ids [3, 3] name one expert twice"),
])
def test_a_bad_payload_fails_in_one_line_naming_response_and_layer(mutate, needle):
    with pytest.raises(ValueError) as e:
        check_routes(mutate(_routes(9)), 10, SPEC, "prompt 3 sample 1")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_vllms_output_is_narrowed_to_the_moe_layers():
    raw = np.zeros((9, 3, 2), dtype=np.uint8)          # every hidden layer; layer 0 dense
    raw[:, 1:] = _routes(9)
    raw[:, 0] = 0                                        # dense rows: zeros, dropped
    out = native_routes(raw, 10, SPEC, "x")
    assert np.array_equal(out, raw[:, 1:].astype(np.int16))
    assert native_routes(None, 10, SPEC, "x") is None    # vLLM dropped them (preemption)


@pytest.mark.parametrize("rid,key", [("0_17-a9aa3654", ("17", 0)), ("3_17-a9aa3654", ("17", 3)),
                                     ("17-b1f536e2", ("17", 0))])
def test_engine_request_ids_map_to_request_and_sample(rid, key):
    assert request_key(rid) == key


def test_episode_routes_keep_each_token_from_the_pass_that_first_ran_it():
    e = Episode(row=None, prompt_ids=[1, 2, 3], env=None, seed=0)
    first = _routes(3 + 2 - 1, seed=1)            # turn 1: prompt 3 + 2 generated
    e.add_routes(Sample(0, [1, 2, 3], [5, 6], [0.0, 0.0], "stop", routed_experts=first))
    e.token_ids += [5, 6, 9, 9]                   # the action, then a 2-token observation
    second = _routes(3 + 4 + 2 - 1, seed=2)       # turn 2 re-runs the whole context
    e.add_routes(Sample(0, [1, 2, 3, 5, 6, 9, 9], [7, 8], [0.0, 0.0], "stop", routed_experts=second))
    assert len(e.routes) == 8
    assert np.array_equal(e.routes[:4], first)    # turn 1's tokens keep turn 1's routes
    assert np.array_equal(e.routes[4:], second[4:])   # the last action token and the observation: turn 2's prefill
    e.add_routes(Sample(0, [], [], [], "stop", routes_missing=True))
    assert e.routes is None and e.routes_missing     # one turn without routes: the episode routes live


def test_training_sequences_carry_routes_in_token_coordinates():
    payload = _routes(6)
    s = Sample(0, [1, 2, 3], [4, 5, 6, 7], [0.0] * 4, "stop", routed_experts=payload)
    missing = Sample(0, [1, 2, 3], [4, 5], [0.0] * 2, "stop", routes_missing=True)
    [a, b] = group_sequences([1, 2, 3], [s, missing], route_shape=(2, 2))
    assert a["routes"].dtype == torch.int16 and a["routes"].shape == (7, 2, 2)
    assert torch.equal(a["routes"][:6], torch.as_tensor(payload))
    assert (a["routes"][6] == -1).all()           # the last token: no engine route
    assert (b["routes"] == -1).all()              # a response without routes: routed live


def test_responses_returned_without_routes_are_counted_in_missing_frac():
    from megatron_rl.rollout.collect import SamplingPlan, collect_rollouts

    def sample(drawn):
        groups = [[Sample(0, ids, [4, 5], [0.0, 0.0], "stop", routes_missing=(g == 0), route_key=(0, i))
                   for g in range(4)] for i, (_, ids) in enumerate(drawn)]
        return groups, [[0.0, 1.0, 0.0, 1.0] for _ in drawn], 0, ""

    out = collect_rollouts(lambda k: [(None, [1, 2, 3])] * k, sample, SamplingPlan(groups_needed=2, n=4, max_tokens=2))
    assert out.metrics()["r3/missing_frac"] == pytest.approx(0.25)
    plain = collect_rollouts(lambda k: [(None, [1, 2, 3])] * k,
                             lambda d: ([[Sample(0, ids, [4], [0.0], "stop") for _ in range(4)]
                                         for _, ids in d], [[0.0, 1.0, 0.0, 1.0] for _ in d], 0, ""),
                             SamplingPlan(groups_needed=2, n=4, max_tokens=2))
    assert "r3/missing_frac" not in plain.metrics()      # routes not asked for: no metric
