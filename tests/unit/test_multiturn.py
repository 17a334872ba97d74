"""Multi-turn collection without an engine: a seeded fake ``generate`` stands in for vLLM (the
real engine runs in tests/e2e/test_multiturn_trainer.py). Token in, token out; environments that
misbehave; one engine call per turn; chat-rendered observations."""

from __future__ import annotations

import pathlib
import random

import pytest
import torch

from megatron_rl.data.prompts import PromptRow, chat_token_ids, render_prompt
from megatron_rl.envs import ENVIRONMENTS, Environment, StepResult, make_environment
from megatron_rl.rollout.engine import Sample
from megatron_rl.rollout.multiturn import (EpisodeLimits, ObservationEncoder, collect_episodes,
                                           episode_metrics)
from megatron_rl.train.rl_batch import group_sequences

V, EOS = 50, 1


class FakeEngine:
    """Seeded random responses; records every call. Token 2 never decodes (a lossy decode: a
    sequence built by re-encoding the decoded text would lose it)."""

    def __init__(self, seed=0, max_len=6):
        self.calls, self.outputs, self.max_len = [], [], max_len
        self.seed = seed

    def __call__(self, prompts, max_tokens, seeds):
        self.calls.append([list(p) for p in prompts])
        out = []
        for p, m, s in zip(prompts, max_tokens, seeds):
            rng = random.Random(s * 7 + len(p))
            n = min(m, rng.randint(1, self.max_len))
            ids = [rng.randrange(2, V) for _ in range(n)]
            finish = "length" if n == m else "stop"
            if finish == "stop":
                ids[-1] = EOS
            lps = [-rng.random() * 3 for _ in ids]
            out.append(Sample(0, list(p), ids, lps, finish))
            self.outputs.append(out[-1])
        return out


class Tok:
    eos_token_id, eos_token, chat_template = EOS, "<eos>", None

    def encode(self, text, add_special_tokens=False):
        return [3 + (ord(c) % (V - 3)) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(t) for t in ids if t not in (EOS, 2))


class Echo(Environment):
    """Observations of random token ids or text; done with probability 1/3 per turn."""

    def __init__(self, *, score=None, text=False):
        super().__init__(score=score)
        self.text = text

    def reset(self, row):
        super().reset(row)
        self.rng = random.Random(row.index)
        return [7, 8] if row.index % 2 else None

    def step(self, action):
        done = self.rng.random() < 1 / 3
        obs = "obs" * self.rng.randint(1, 3) if self.text else \
            [self.rng.randrange(3, V) for _ in range(self.rng.randint(1, 5))]
        return StepResult(observation=obs, reward=0.25, done=done, tool_call=not done)

    def final_reward(self):
        return 1.0


def _rows(n):
    return [(PromptRow(i, f"p{i}"), [5 + i, 6, 7]) for i in range(n)]


def _collect(env_cls, engine=None, n=3, rows=4, limits=None, text=False, **kw):
    engine = engine or FakeEngine()
    limits = limits or EpisodeLimits(max_turns=4, max_total_tokens=40, vocab_size=V)
    out = collect_episodes(_rows(rows), n, lambda row: env_cls(text=text, **kw) if env_cls is Echo
                           else env_cls(**kw), engine, Tok().decode, ObservationEncoder(Tok(), False),
                           limits, seed=11, failure_score=-1.0)
    return engine, out


@pytest.mark.parametrize("text", [False, True])
def test_training_sequence_is_engine_ids_plus_observation_ids_exactly(text):
    engine, (groups, rewards, failures, _) = _collect(Echo, text=text)
    assert failures == 0
    for group in groups:
        for s in group:
            # rebuild the episode from the engine's calls: each later call's prompt extends the last
            mask = torch.tensor(s.action_mask)
            assert len(s.token_ids) == len(s.logprobs) == len(mask)
            seqs = group_sequences(s.prompt_ids, [s])[0]
            assert seqs["tokens"].tolist() == s.prompt_ids + s.token_ids
            L = len(s.prompt_ids)
            assert torch.equal(seqs["loss_mask"][L:], mask.float())
            # rollout log-probs in label coordinates, zero on observation tokens
            assert torch.equal(seqs["rollout_logprobs"][L - 1:-1] != 0, mask.bool())
    # every engine output sits, right after the context it was generated from, in an episode's
    # sequence, at mask-1 slots with the engine's log-probs
    episodes = [s for g in groups for s in g]
    for call, outs in _calls_with_outputs(engine):
        for prompt, o in zip(call, outs):
            assert any(_continues(ep, prompt, o) for ep in episodes)
    # ... and nothing else is an action: mask-1 tokens are exactly the engine's tokens
    assert sum(len(o.token_ids) for o in engine.outputs) == sum(sum(s.action_mask) for s in episodes)


def _calls_with_outputs(engine):
    i = 0
    for call in engine.calls:
        yield call, engine.outputs[i:i + len(call)]
        i += len(call)


def _continues(ep, prompt, out) -> bool:
    seq = ep.prompt_ids + ep.token_ids
    a, b = len(prompt) - len(ep.prompt_ids), len(prompt) - len(ep.prompt_ids) + len(out.token_ids)
    return (seq[:len(prompt)] == prompt and ep.token_ids[a:b] == out.token_ids
            and ep.action_mask[a:b] == [1] * len(out.token_ids) and ep.logprobs[a:b] == out.logprobs)


def test_one_engine_call_per_turn_over_every_live_episode():
    engine, (groups, _, _, _) = _collect(Echo, rows=5, n=4)
    turns = [s.info["turns"] for g in groups for s in g]
    assert len(engine.calls) == max(turns)
    assert len(engine.calls[0]) == 20
    for k, call in enumerate(engine.calls):
        assert len(call) == sum(t > k for t in turns)


def test_episodes_of_a_group_draw_with_their_own_seeds():
    seen = []

    def gen(prompts, max_tokens, seeds):
        seen.extend(seeds)
        return FakeEngine()(prompts, max_tokens, seeds)

    collect_episodes(_rows(2), 4, lambda row: Echo(), gen, Tok().decode,
                     ObservationEncoder(Tok(), False), EpisodeLimits(2, 30), seed=3)
    assert len(set(seen)) == len(seen)


def test_reward_is_step_rewards_plus_final_reward_and_limits_end_episodes():
    _, (groups, rewards, _, _) = _collect(Echo, limits=EpisodeLimits(max_turns=2, max_total_tokens=40))
    for g, r in zip(groups, rewards):
        for s, x in zip(g, r):   # the environment reads every action, the last one included
            assert x == pytest.approx(0.25 * s.info["turns"] + 1.0)
            assert 1 <= s.info["turns"] <= 2
    assert {s.finish_reason for g in groups for s in g} >= {"turns"}
    # a tight token budget: nothing past max_total_tokens, ends "length"
    _, (groups, _, _, _) = _collect(Echo, limits=EpisodeLimits(max_turns=9, max_total_tokens=5))
    assert all(len(s.token_ids) <= 5 for g in groups for s in g)
    assert any(s.finish_reason == "length" for g in groups for s in g)


def test_long_observations_are_cut_and_counted():
    class Long(Echo):
        def step(self, action):
            return StepResult(observation=list(range(3, 40)), done=False)

    _, (groups, _, _, _) = _collect(Long, limits=EpisodeLimits(3, 60, max_obs_tokens=4))
    for s in (s for g in groups for s in g):
        runs = "".join(map(str, s.action_mask)).replace("1", " ").split()
        assert all(len(r) <= 4 for r in runs[1:] if r)
        assert s.info["obs_cut"] >= 1


class Raises(Echo):
    def step(self, action):
        raise RuntimeError("tool crashed")


class Garbage(Echo):
    def step(self, action):
        return {"observation": "x"}


class BadIds(Echo):
    def step(self, action):
        return StepResult(observation=[3, V + 5])


class NeverEnds(Echo):
    def step(self, action):
        return StepResult(observation=[4], done=False)


class BadReset(Echo):
    def reset(self, row):
        if row.index == 1:
            raise KeyError("missing field")
        return super().reset(row)


class BadFinal(Echo):
    def final_reward(self):
        return "high"


@pytest.mark.parametrize("cls, where, message", [
    (Raises, "step", "RuntimeError: tool crashed"), (Garbage, "step", "not a StepResult"),
    (BadIds, "observation", "outside the vocabulary"), (BadReset, "reset", "missing field"),
    (BadFinal, "final_reward", "not a number")])
def test_misbehaving_environment_is_a_recorded_failure_and_the_rest_go_on(cls, where, message):
    _, (groups, rewards, failures, first) = _collect(cls)
    failed = [s for g in groups for s in g if s.info["failed"]]
    assert failures == len(failed) > 0
    assert f": {where}: {cls.__name__}: " in first and message in first and first.startswith("turn ")
    assert all(s.finish_reason == "error" for s in failed)
    assert all(r == -1.0 for g, rs in zip(groups, rewards) for s, r in zip(g, rs) if s.info["failed"])
    if cls is BadReset:   # only row 1's episodes fail; the others run to their end
        assert len(failed) == 3 and all(s.prompt_ids[0] == 6 for s in failed)


def test_environment_that_never_ends_stops_at_max_turns_without_failing():
    _, (groups, _, failures, _) = _collect(NeverEnds, limits=EpisodeLimits(3, 200))
    assert failures == 0
    assert all(s.finish_reason == "turns" and s.info["turns"] == 3 for g in groups for s in g)
    m = episode_metrics([s for g in groups for s in g])
    assert m["truncated"] == m["episodes"] == 12


# ---- chat rendering ---------------------------------------------------------------------------
CHAT = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}")


def chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<s>", "user", "assistant", "tool", "Q", "A", "call", "result",
             "7", "2", "what", "is"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    t.chat_template = CHAT
    return t


def test_chat_observation_tokens_continue_the_template_exactly():
    """prompt (template) + engine's assistant tokens + observation tokens (template delta) + the
    engine's next turn equal the template's rendering of the whole conversation."""
    tok = chat_tokenizer()
    enc = ObservationEncoder(tok, chat=True, role="tool")
    conv = [{"role": "user", "content": "what is Q"}]
    prompt = render_prompt(PromptRow(0, "what is Q"), tok, chat=True, max_tokens=64)
    assert prompt == [2, 3, 12, 13, 6, 1, 2, 4]     # <s> user what is Q </s> <s> assistant
    turn1 = tok.encode("call", add_special_tokens=False) + [tok.eos_token_id]
    obs = enc("result 7 2", turn1[-1])
    turn2 = tok.encode("7 2", add_special_tokens=False) + [tok.eos_token_id]
    full = conv + [{"role": "assistant", "content": "call"}, {"role": "tool", "content": "result 7 2"},
                   {"role": "assistant", "content": "7 2"}]
    want = chat_token_ids(tok, full, add_generation_prompt=False)
    assert prompt + turn1 + obs + turn2 == want
    # a turn cut by a token limit (no eos): the framing closes it with an eos token (masked)
    assert enc("result 7 2", 8)[0] == tok.eos_token_id


def test_chat_render_needs_a_template():
    with pytest.raises(ValueError, match="env.render"):
        ObservationEncoder(Tok(), chat=True)


# ---- built-in environments --------------------------------------------------------------------
def test_calculator_tool_then_answer():
    env = make_environment("calculator", {"max_tool_calls": 2}, score=lambda t: float(t.strip() == "14"))
    env.reset(PromptRow(0, "2*(3+4)?"))
    r = env.step("let me <calc>2 * (3 + 4)</calc>")
    assert r.observation == "<result>14</result>" and r.tool_call and not r.done
    bad = env.step("<calc>__import__('os')</calc>")
    assert bad.tool_error and bad.observation.startswith("<error>")
    over = env.step("<calc>1+1</calc>")              # the third call: over max_tool_calls
    assert over.done and over.reward == 0.0
    env2 = make_environment("calculator", {}, score=lambda t: float(t.strip() == "14"))
    env2.reset(PromptRow(0, ""))
    assert env2.step("14") == StepResult(reward=1.0, done=True)
    assert env2.step("<calc>2**10000</calc>").tool_error


def test_lookup_tool_returns_the_hidden_value_only_through_the_call():
    from megatron_rl.data.synthetic import lookup_value, make_rows

    row = make_rows("lookup", 1, min_len=4, max_len=4)[0]
    assert row["label"] == lookup_value(row["metadata"]["key"], 0, 1) and len(row["label"]) == 1
    prow = PromptRow(0, row["prompt"], row["label"], row["metadata"])
    env = make_environment("lookup", {"call_bonus": 0.1}, score=lambda t: float(t == row["label"]))
    env.reset(prow)
    r = env.step("call 9 9")                     # unkeyed: the row's key, whatever follows
    assert r.observation == f"result {row['label']} =" and r.tool_call and r.reward == 0.1
    assert env.step("call").reward == 0.0        # the bonus is paid once
    keyed = make_environment("lookup", {"keyed": True}, score=None)
    keyed.reset(prow)
    assert keyed.step("call 1 2 3").observation == f"result {lookup_value('1 2 3', 0, 1)} ="
    answer = env.step(row["label"])
    assert answer.done and answer.reward == 1.0
    # the values are not a function a small model could learn: neighbouring keys scatter
    assert len({lookup_value(f"1 2 {d}", 0, 1) for d in range(10)}) >= 5


def test_unknown_environment_and_parameter_are_named():
    with pytest.raises(KeyError, match="known: calculator, lookup, python"):
        make_environment("calculater", {})
    with pytest.raises(TypeError, match="max_tool_calls"):
        make_environment("calculator", {"max_calls": 3})
    assert "calculator" in ENVIRONMENTS


def test_python_tool_runs_code_in_the_sandbox():
    env = make_environment("python", {"timeout_s": 3.0}, score=None)
    env.reset(PromptRow(0, ""))
    r = env.step("compute:\n```python\nprint(6 * 7)\n```")
    assert r.observation == "<output>\n42\n</output>" and r.tool_call and not r.tool_error
    bad = env.step("```python\nraise SystemExit(3)\n```")
    assert bad.tool_error and "exit status 3" in bad.observation
    slow = env.step("```python\nwhile True: pass\n```")
    assert slow.tool_error and "limit" in slow.observation


# ---- the env config section -------------------------------------------------------------------
TOOL = pathlib.Path(__file__).resolve().parents[2] / "configs" / "recipes" / "tiny_moe_tool.yaml"


@pytest.mark.parametrize("override, needle", [
    ("env.name=calculater", "env.name: unknown environment 'calculater' (did you mean 'calculator'?)"),
    ("env.params.max_calls=2", "env.params: environment 'lookup' has no parameter 'max_calls'"),
    ("env.params.max_tool_calls=0", "env.params: max_tool_calls must be >= 1"),
    ("env.module=no/such/envs.py", "env.module: cannot import 'no/such/envs.py'"),
    ("env.module=no_such_module_xyz", "env.module: cannot import 'no_such_module_xyz'"),
    ("model.routing_replay=true", "model.routing_replay is gone: use train.routing_replay"),
    ("rollout.ignore_eos=true", "rollout.ignore_eos: a multi-turn turn ends"),
    ("env.max_turns=0", "env.max_turns"),
    ("env.render=html", "env.render"),
])
def test_bad_env_settings_fail_at_load_naming_the_key(override, needle):
    from megatron_rl.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(TOOL, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_env_module_registers_a_users_environment(tmp_path):
    from megatron_rl.config import load_config

    (tmp_path / "my_envs.py").write_text(
        "from megatron_rl.envs import ENVIRONMENTS, Environment, StepResult\n"
        "@ENVIRONMENTS.register('guess_t')\n"
        "class Guess(Environment):\n"
        "    def __init__(self, *, score=None, high: int = 100):\n"
        "        super().__init__(score=score)\n"
        "    def step(self, action):\n"
        "        return StepResult(done=True)\n")
    cfg = load_config(TOOL.with_name("tiny_moe_gspo.yaml"),
                      [f"env.module={tmp_path / 'my_envs.py'}", "env.name=guess_t", "env.params.high=5"])
    assert cfg.env.name == "guess_t"
    env = make_environment("guess_t", {"high": 5})
    env.reset(PromptRow(0, ""))
    assert env.step("x").done


def test_the_docs_environment_example_plays_episodes(tmp_path):
    """docs/rollout.md's "Writing an environment" example, loaded through env.module as a user
    would, plays whole episodes (the fake engine guesses numbers)."""
    from megatron_rl.envs import load_environment_module

    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "rollout.md").read_text()
    code = doc.split("### Writing an environment", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "my_envs.py").write_text(code)
    load_environment_module(str(tmp_path / "my_envs.py"))
    groups, rewards, failures, err = collect_episodes(
        [(PromptRow(0, "guess", label="7"), [5, 6])], 4,
        lambda row: make_environment("guess", {"high": 50}), FakeEngine(), Tok().decode,
        ObservationEncoder(Tok(), False), EpisodeLimits(5, 60, vocab_size=V), seed=0)
    assert failures == 0, err
    assert all(s.info["turns"] >= 1 and s.info["env_tokens"] > 0 for s in groups[0])
