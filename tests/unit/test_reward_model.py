"""The learned reward model's pure parts (what it reads, how its scores are shaped and combined),
its config and the refusal of a broken head, against brute-force references."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from megatron_rl.config import ConfigError
from megatron_rl.data.prompts import PromptRow
from megatron_rl.rewards.learned import (conversation, rm_token_ids, RunningMoments,
                                         scored_length, shape_scores)
from megatron_rl.rewards.tiny_rm import digit_score, rm_tokenizer
from megatron_rl.rollout.collect import Rollouts
from megatron_rl.rollout.scoring import add_model_scores, Scorer


# ---- what the model reads -------------------------------------------------------------------

def _hf_read_index(ids, pad):
    """transformers' ``*ForSequenceClassification`` rule, as it writes it."""
    x = torch.tensor([ids])
    non_pad = (x != pad).int()
    return int((torch.arange(x.shape[1]) * non_pad).argmax(-1))


@pytest.mark.parametrize("ids", [[5, 6, 7], [5, 6, 0, 0], [0, 5, 0, 6], [0, 0, 0], [5]])
def test_the_score_is_read_where_transformers_reads_it(ids):
    assert scored_length(ids, 0) - 1 == _hf_read_index(ids, 0)
    assert scored_length(ids, None) == len(ids)


def test_chat_rows_go_through_the_reward_models_own_template():
    tok = rm_tokenizer()
    ids = rm_token_ids(tok, "copy 3 1 =", "3 1", use_chat_template=True)
    assert tok.convert_ids_to_tokens(ids) == ["<|user|>", "copy", "3", "1", "=", "<|end|>",
                                              "<|assistant|>", "3", "1", "<|end|>"]
    messages = [{"role": "system", "content": "9"}, {"role": "user", "content": "copy 3 ="}]
    ids = rm_token_ids(tok, messages, "3", use_chat_template=True)
    assert tok.convert_ids_to_tokens(ids)[:3] == ["<|system|>", "9", "<|end|>"]
    assert conversation(messages, "3")[-1] == {"role": "assistant", "content": "3"}


def test_without_the_template_it_reads_prompt_and_response_text():
    tok = rm_tokenizer()
    assert rm_token_ids(tok, "copy 3 =", " 3", use_chat_template=False) == \
        tok("copy 3 = 3")["input_ids"]


def test_the_demo_property_is_the_mean_digit_over_nine():
    assert digit_score("9 9 0") == pytest.approx(2 / 3)
    assert digit_score("copy =") == 0.0 and digit_score("") == 0.0


# ---- shaping --------------------------------------------------------------------------------

def test_running_moments_merged_per_round_equal_those_of_every_score():
    g = torch.Generator().manual_seed(0)
    rounds = [torch.randn(n, generator=g) * 3 + 1 for n in (1, 7, 30, 2)]
    m = RunningMoments()
    for r in rounds:
        m.update(r)
    every = torch.cat(rounds).double()
    assert m.count == every.numel()
    assert m.mean == pytest.approx(float(every.mean()), abs=1e-12)
    assert m.var == pytest.approx(float(every.var(unbiased=False)), abs=1e-12)
    back = RunningMoments()
    back.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert back.state_dict() == m.state_dict()


def test_normalised_scores_use_every_score_so_far_then_clip():
    m = RunningMoments()
    first, second = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, -4.0])
    shape_scores(first, m, clip=0.0)
    out = shape_scores(second, m, clip=1.5)
    every = torch.cat([first, second]).double()
    want = ((second.double() - every.mean()) / math.sqrt(float(every.var(unbiased=False)) + 1e-8))
    assert torch.allclose(out, want.clamp(-1.5, 1.5))
    before = m.state_dict()
    shape_scores(torch.tensor([100.0]), m, clip=0.0, update=False)   # validation
    assert m.state_dict() == before
    assert torch.equal(shape_scores(second, None, clip=0.0), second.double())


# ---- combined with the other rewards --------------------------------------------------------

class _FakeRM:
    """Scores a sequence by its length; takes at most 4 tokens."""
    max_length = 4

    def __init__(self):
        self.seen = []

    def token_ids(self, prompt, response):
        return response.split()

    def score_ids(self, seqs):
        self.seen.append(list(seqs))
        return torch.tensor([float(len(s)) for s in seqs], dtype=torch.float64)


def _sample(text):
    return SimpleNamespace(token_ids=text, prompt_ids=[0], finish_reason="stop")


def test_model_scores_are_added_with_their_weight_and_leave_unscored_groups_alone():
    rows = [PromptRow(0, "p"), PromptRow(1, "q")]
    groups = [[_sample("a b"), _sample("a b c")], [_sample("a"), _sample("a b c d e")]]
    rm = _FakeRM()
    out, failures, error, raw = add_model_scores(
        rm, rows, groups, [[0.5, 0.0], [1.0, 1.0]], weight=2.0, shape=lambda x: x * 10,
        decode=lambda t: t, failure_score=-1.0)
    assert out == [[0.5 + 2 * 20, 0.0 + 2 * 30], [1.0 + 2 * 10, 1.0 + 2 * -1.0]]
    assert failures == 1 and "5 tokens exceed" in error and raw == [2.0, 3.0, 1.0]
    out, *_ = add_model_scores(_FakeRM(), rows, groups, [[None, None], [0.0, 0.0]], weight=1.0,
                               shape=lambda x: x, decode=lambda t: t)
    assert out[0] == [None, None]   # a service left it unscored: it stays unscored


def test_the_rule_part_leaves_the_model_term_to_the_trainer():
    from megatron_rl.rewards.config import RewardConfig, RewardComponentConfig

    cfg = RewardConfig(components=[RewardComponentConfig("model", 0.5),
                                   RewardComponentConfig("format", 0.2)])
    scorer = Scorer.of(cfg, SimpleNamespace(decode=lambda ids, **_: ""))
    r = scorer("<answer>3</answer>", PromptRow(0, "p", "3"))
    assert r.score == pytest.approx(0.2 * r.parts["format"]) and "model" not in r.parts
    assert cfg.model_weight() == 0.5
    alone = Scorer.of(RewardConfig(name="model"), SimpleNamespace(decode=lambda ids, **_: ""))
    assert alone("x", PromptRow(0, "p", "3")).score == 0.0


def test_model_scores_are_logged_raw():
    m = Rollouts(model_scores=[0.25, 0.75]).metrics()
    assert m["reward/model_mean"] == 0.5 and m["reward/model_std"] == pytest.approx(0.3535534)
    assert "reward/model_mean" not in Rollouts().metrics()


# ---- config and refusals ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory):
    from megatron_rl.model.tiny import write_tiny_hf_model

    d = tmp_path_factory.mktemp("rm")
    write_tiny_hf_model("qwen3", d, reward_model=True, pad_token_id=0)
    rm_tokenizer().save_pretrained(str(d))
    return d


def _reward(**kw):
    from megatron_rl.rewards.config import RewardConfig, RewardModelConfig

    model = kw.pop("model", {})
    return RewardConfig(model=RewardModelConfig(**model), **kw)


def test_reward_model_config_refusals_name_the_field(tmp_path, tiny_rm_dir):
    from megatron_rl.rewards.config import RewardComponentConfig

    with pytest.raises(ConfigError, match=r"^reward\.model\.path: required"):
        _reward(name="model").check()
    with pytest.raises(ConfigError, match=r"^reward\.model\.path: .* has no config\.json"):
        _reward(name="model", model={"path": str(tmp_path)}).check()
    causal = tmp_path / "causal"
    causal.mkdir()
    (causal / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(ConfigError, match=r"^reward\.model\.path: architectures"):
        _reward(name="model", model={"path": str(causal)}).check()
    two = tmp_path / "two"
    two.mkdir()
    cfg = json.loads((tiny_rm_dir / "config.json").read_text())
    (two / "config.json").write_text(json.dumps({**cfg, "id2label": {"0": "a", "1": "b"}}))
    with pytest.raises(ConfigError, match=r"^reward\.model\.path: .* has 2 labels"):
        _reward(name="model", model={"path": str(two)}).check()
    with pytest.raises(ConfigError, match=r"^reward\.model_path: .* differ"):
        _reward(name="model", model_path=str(tiny_rm_dir), model={"path": "x"}).check()
    r = _reward(name="model", model_path=str(tiny_rm_dir))
    r.check()
    assert r.model.path == str(tiny_rm_dir) and r.uses_model()
    with pytest.raises(ConfigError, match=r"'model' appears more than once"):
        _reward(components=[RewardComponentConfig("model"), RewardComponentConfig("model")],
                model={"path": str(tiny_rm_dir)}).check()


def _write_weights(src, dst, edit):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("score.weight"), r"has no score\.weight"),
    (lambda t: t.update({"score.weight": torch.zeros(2, 64)}), r"score\.weight has shape \[2, 64\]"),
    (lambda t: t.update({"score.bias": torch.zeros(1)}), r"holds score\.bias"),
])
def test_a_missing_or_misshapen_score_head_is_refused_naming_it(tmp_path, tiny_rm_dir, edit, message):
    from megatron_rl.model.build import ModelOptions
    from megatron_rl.parallel.config import Layout
    from megatron_rl.train.reward_model import load_reward_model

    d = _write_weights(tiny_rm_dir, tmp_path / "rm", edit)
    with pytest.raises(ConfigError, match=r"^reward\.model\.path: .*" + message):
        load_reward_model(str(d), Layout(), ModelOptions(), None)


def test_a_tokenizer_larger_than_the_reward_models_vocabulary_is_refused(tmp_path, tiny_rm_dir):
    from megatron_rl.model.build import ModelOptions
    from megatron_rl.parallel.config import Layout
    from megatron_rl.train.reward_model import load_reward_model

    d = _write_weights(tiny_rm_dir, tmp_path / "rm", lambda t: None)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": 16}))
    with pytest.raises(ConfigError, match=r"^reward\.model\.path: its tokenizer has 26 tokens "
                                          r"but the model's vocab_size is 16"):
        load_reward_model(str(d), Layout(), ModelOptions(), None)


def test_dynamic_sampling_filters_on_the_reward_models_scores_and_logs_every_round():
    from megatron_rl.rollout.collect import collect_rollouts, SamplingPlan

    rm = _FakeRM()
    texts = {0: ["a", "a"], 1: ["a", "a b"], 2: ["a b", "a b"], 3: ["a b c", "a"]}
    position = iter(range(100))

    def draw(k):
        return [(PromptRow(i, str(i)), [i]) for i in (next(position) for _ in range(k))]

    def sample(drawn):
        """Every rule score 0: only the model's term tells the responses apart."""
        groups = [[_sample(t) for t in texts[ids[0]]] for _, ids in drawn]
        scores, failures, error, raw = add_model_scores(
            rm, [r for r, _ in drawn], groups, [[0.0] * 2 for _ in drawn], weight=1.0,
            shape=lambda x: x, decode=lambda t: t)
        return groups, scores, failures, error, {}, {}, "", raw

    out = collect_rollouts(draw, sample, SamplingPlan(groups_needed=2, n=2, max_tokens=4,
                                                      dynamic=True, max_rounds=3))
    assert [r.prompt for r in out.rows] == ["1", "3"]   # the groups whose model scores differ
    assert out.model_scores == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 1.0]
    assert out.rounds == 3 and len(rm.seen) == 3   # rounds of 2, 1 and 1 prompts
