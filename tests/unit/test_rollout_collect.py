"""The step's rollout collection: DAPO refill, overlong shaping, reward failures, and the
sequences handed to Megatron (label coordinates), against hand-computed expectations."""

from __future__ import annotations

import pytest
import torch

from megatron_rl.data.prompts import PromptRow
from megatron_rl.rewards import REWARDS
from megatron_rl.rollout.collect import SamplingPlan, collect_rollouts, score_groups
from megatron_rl.rollout.scoring import Scorer
from megatron_rl.rollout.engine import Sample
from megatron_rl.train.rl_batch import group_sequences, update_slices


def _stream(n_rows=100):
    rows = [PromptRow(i, f"p{i}", str(i % 2)) for i in range(n_rows)]
    pos = {"next": 0}

    def draw(k):
        out = [(rows[(pos["next"] + j) % n_rows], [3, 4]) for j in range(k)]
        pos["next"] += k
        return out
    return draw, pos


def _sampler(informative):
    """Group of prompt i is informative (rewards differ) iff informative(i); G = 4."""
    calls = []

    def sample(drawn):
        calls.append(len(drawn))
        groups, scores = [], []
        for row, ids in drawn:
            groups.append([Sample(row.index, ids, [5] * (1 + k), [-1.0] * (1 + k), "stop") for k in range(4)])
            scores.append([0.0, 1.0, 0.0, 1.0] if informative(row.index) else [1.0] * 4)
        return groups, scores, 0, ""
    return sample, calls


def test_dynamic_sampling_refills_until_enough_informative_groups():
    draw, pos = _stream()
    sample, calls = _sampler(lambda i: i % 3 == 0)   # one prompt in three teaches something
    plan = SamplingPlan(groups_needed=4, n=4, max_tokens=8, dynamic=True, oversample=2.0, max_rounds=10)
    out = collect_rollouts(draw, sample, plan)
    assert [r.index for r in out.rows] == [0, 3, 6, 9]
    assert calls == [8, 2]                 # 8 drawn (3 kept: 0, 3, 6), then ceil(1 * 2) = 2 (9 kept)
    assert out.groups_drawn == 10 and out.rounds == 2
    assert len(out.all_rewards) == 40      # the reward metric counts every sampled response
    m = out.metrics()
    assert m["reward/mean"] == sum(out.all_rewards) / 40 and m["reward/min"] == 0.0
    # 10 groups drawn, 4 informative (0, 3, 6, 9): 6 with zero reward std
    assert m["rollout/zero_std_frac"] == 0.6 and m["response/prompt_length_mean"] == 2.0


def test_dynamic_sampling_stops_after_max_rounds_with_what_it_kept():
    draw, _ = _stream()
    sample, calls = _sampler(lambda i: i == 1)
    plan = SamplingPlan(groups_needed=4, n=4, max_tokens=8, dynamic=True, oversample=1.0, max_rounds=3)
    out = collect_rollouts(draw, sample, plan)
    assert [r.index for r in out.rows] == [1] and calls == [4, 3, 3]


def test_without_dynamic_sampling_uninformative_groups_are_kept():
    draw, _ = _stream()
    sample, calls = _sampler(lambda i: False)
    out = collect_rollouts(draw, sample, SamplingPlan(groups_needed=3, n=4, max_tokens=8))
    assert len(out.rows) == 3 and calls == [3]


def test_overlong_penalty_shapes_the_kept_rewards():
    draw, _ = _stream()
    sample, _ = _sampler(lambda i: True)
    plan = SamplingPlan(groups_needed=1, n=4, max_tokens=4, overlong_buffer=2, overlong_factor=1.0)
    out = collect_rollouts(draw, sample, plan)
    # lengths 1..4 with max 4, buffer 2: penalties 0, 0, -0.5, -1
    assert torch.allclose(out.rewards[0], torch.tensor([0.0, 1.0, -0.5, 0.0]))
    assert out.all_rewards == [0.0, 1.0, 0.0, 1.0]     # raw rewards for the learning curve


def test_a_reward_that_raises_is_recorded_not_fatal(monkeypatch):
    def _raises(response, label, *, prompt="", metadata=None):
        if response == "b":
            raise RuntimeError("bad response")
        return 1.0

    monkeypatch.setitem(REWARDS, "_test_raises_on_b", _raises)
    rows = [PromptRow(0, "p", "x")]
    groups = [[Sample(0, [1], [7], [0.0], "stop"), Sample(0, [1], [8], [0.0], "stop")]]
    scorer = Scorer("_test_raises_on_b", {}, lambda ids: "a" if ids == [7] else "b", failure_score=-1.0)
    scores, failures, error, parts = score_groups(scorer, rows, groups)
    assert scores == [[1.0, -1.0]] and failures == 1 and "bad response" in error and parts == {}


def test_group_sequences_put_engine_logprobs_in_label_coordinates():
    s = Sample(0, [10, 11, 12], [20, 21], [-0.5, -0.25], "stop")
    [seq] = group_sequences([10, 11, 12], [s])
    assert seq["tokens"].tolist() == [10, 11, 12, 20, 21]
    assert seq["loss_mask"].tolist() == [0, 0, 0, 1, 1]
    # row p is about token p + 1: token 20 (position 3) is predicted at row 2
    assert seq["rollout_logprobs"].tolist() == [0, 0, -0.5, -0.25, 0]


def test_update_slices_cover_every_micro_batch_once_in_order():
    for n, u in [(8, 2), (7, 3), (2, 4), (1, 1)]:
        slices = update_slices(n, u)
        assert [i for s in slices for i in s] == list(range(n))
        assert len(slices) == min(n, u)
        assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_engine_parts_merge_back_into_draw_order():
    from megatron_rl.rollout.collect import merge_engine_parts

    # 5 draws over 2 engines: engine 0 sampled draws 0, 2, 4 and engine 1 draws 1, 3; the
    # non-reporting ranks send None, and parts arrive in rank order, not engine order
    parts = [None, (1, ["g1", "g3"], [1, 3], 2, "e1", {"fmt": 1.0}, {"http_calls": 2.0}, "down"),
             (0, ["g0", "g2", "g4"], [0, 2, 4], 1, "", {"fmt": 2.0, "acc": 3.0},
              {"http_calls": 1.0}, ""), None]
    assert merge_engine_parts(parts, 5, 2) == (["g0", "g1", "g2", "g3", "g4"], [0, 1, 2, 3, 4], 3,
                                               "e1", {"fmt": 3.0, "acc": 3.0},
                                               {"http_calls": 3.0}, "down")


def test_weighted_reward_components_sum_and_log_each_part(tmp_path):
    import pathlib

    from megatron_rl.config import ConfigError, load_config

    recipe = pathlib.Path(__file__).resolve().parents[2] / "configs/recipes/tiny_moe_gspo.yaml"
    mine = tmp_path / "r.py"
    mine.write_text("def short(response, label, *, prompt='', metadata=None):\n"
                    "    return float(len(response) <= 3)\n")
    cfg = load_config(recipe, [f"reward.components=[{{name: word_match, weight: 1.0}}, "
                               f"{{name: '{mine}:short', weight: 0.5}}, "
                               f"{{name: exact_match, weight: 2.0, params: {{ignore_case: true}}}}]"])
    scorer = Scorer.of(cfg.reward, None)
    scorer = Scorer(scorer.name, scorer.params, lambda ids: {7: "a b", 8: "A B C D"}[ids[0]],
                    components=scorer.components)
    rows = [PromptRow(0, "p", "a b")]
    groups = [[Sample(0, [1], [7], [0.0], "stop"), Sample(0, [1], [8], [0.0], "stop")]]
    scores, failures, _, parts = score_groups(scorer, rows, groups)
    # "a b": word_match 1, short 1, exact 1 -> 1 + 0.5 + 2; "A B C D": 0, 0, 0
    assert scores == [[3.5, 0.0]] and failures == 0
    assert parts == {"word_match": 1.0, "short": 1.0, "exact_match": 1.0}
    draw, _ = _stream()
    out = collect_rollouts(draw, lambda drawn: ([groups[0]], scores, 0, "", parts),
                           SamplingPlan(groups_needed=1, n=2, max_tokens=8))
    m = out.metrics()
    assert m["reward/short/mean"] == 0.5 and m["reward/mean"] == 1.75
    with pytest.raises(ConfigError, match=r"reward.components\[1\].params: .*no parameter 'bogus'"):
        load_config(recipe, ["reward.components=[{name: word_match}, {name: exact_match, "
                             "params: {bogus: 1}}]"])


def test_a_rollout_resolves_each_reward_once_not_per_response(monkeypatch):
    import megatron_rl.rewards as rewards

    calls = []
    real = rewards.keyword_params
    monkeypatch.setattr(rewards, "keyword_params", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = [PromptRow(0, "p", "a")]
    groups = [[Sample(0, [1], [7], [0.0], "stop") for _ in range(16)]]
    for scorer in (Scorer("exact_match", {"ignore_case": True}, lambda ids: "A"),
                   Scorer("exact_match", {}, lambda ids: "a", components=(
                       rewards.Component("exact_match", 1.0, {}, "em"),
                       rewards.Component("word_match", 0.5, {}, "wm")))):
        calls.clear()
        scores, failures, _, _ = score_groups(scorer, rows, groups)
        score_groups(scorer, rows, groups)
        assert failures == 0 and scores[0][0] in (1.0, 1.5)
        assert len(calls) == len(scorer.components or [1]), calls
