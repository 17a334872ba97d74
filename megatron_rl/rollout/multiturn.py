"""Multi-turn rollouts: every live episode of a step advances one turn per engine call.

Legend: ``P`` prompts drawn, ``G`` episodes per prompt, ``E = P * G`` episodes.

Token in, token out: an episode's context is the prompt ids, then exactly the ids the engine
generated, then each observation's ids; generated text is decoded only to be *read* by the
environment, never re-encoded into the sequence (a decode/encode round trip can change the ids
and silently train on tokens the policy never sampled). The trainer's sequence is therefore the
engine's, bit for bit: ``action_mask`` is 1 on engine tokens (behaviour log-probs from the engine)
and 0 on observation tokens (log-prob 0, never actions).

Limits: ``max_turns`` LLM turns, ``max_obs_tokens`` per observation (cut, counted),
``max_total_tokens`` for everything after the prompt (``rollout.max_response_len``), and
``max_turn_tokens`` per turn. An episode that reaches a limit ends ``truncated``; the
environment's ``final_reward`` still scores it. An environment that raises or returns something
malformed ends its episode as a recorded failure (``failure_score``, turn and message kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_rl.envs import check_observation, check_step_result, make_environment
from megatron_rl.fields import ConfigError
from megatron_rl.rollout.engine import Sample
from megatron_rl.rollout.scoring import Scorer

# prompts [E'] (token ids), max_tokens [E'], seeds [E'] -> one Sample per prompt
GenerateFn = Callable[[List[List[int]], List[int], List[int]], List[Sample]]


@dataclass(frozen=True)
class EpisodeLimits:
    """The token and turn limits of an episode."""
    max_turns: int
    max_total_tokens: int
    max_turn_tokens: int = 0        # 0: whatever of max_total_tokens is left
    max_obs_tokens: int = 256
    vocab_size: int = 0             # observation ids must be below it (0: unchecked)


@dataclass
class Episode:
    """One episode in progress: its tokens, action mask, engine log-probs and routes, counters."""
    row: Any
    prompt_ids: List[int]
    env: Any
    seed: int
    token_ids: List[int] = field(default_factory=list)
    action_mask: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    obs_cut: int = 0
    reward: float = 0.0
    done: bool = False
    finish: str = "stop"            # stop | length (a token limit) | turns (max_turns) | error
    error: Optional[str] = None
    routes: Any = None              # the engine's expert routes so far (rollout.routes payload)
    routes_missing: bool = False    # a turn came back without them: the episode is routed live

    def room(self, limits: EpisodeLimits) -> int:
        """Tokens left before ``max_total_tokens``."""
        return limits.max_total_tokens - len(self.token_ids)

    def sample(self, prompt_index: int) -> Sample:
        """The finished episode as a ``Sample`` (response = everything after the prompt)."""
        info = {"turns": self.turns, "tool_calls": self.tool_calls, "tool_errors": self.tool_errors,
                "env_tokens": len(self.token_ids) - sum(self.action_mask),
                "obs_cut": self.obs_cut, "failed": self.error is not None}
        return Sample(prompt_index, list(self.prompt_ids), list(self.token_ids), list(self.logprobs),
                      self.finish, routed_experts=self.routes, routes_missing=self.routes_missing,
                      action_mask=list(self.action_mask), info=info)

    def add_routes(self, turn: Sample) -> None:
        """Extend the episode's routes with a turn's: rows past those already known (a turn's
        payload starts at the prompt; the tokens before it were routed by earlier passes, which
        keep theirs; the previous turn's last token and the observation's were first run
        through the model by this turn's prefill)."""
        if turn.routes_missing or self.routes_missing:
            self.routes, self.routes_missing = None, True
        elif turn.routed_experts is not None:
            known = 0 if self.routes is None else len(self.routes)
            new = turn.routed_experts[known:]
            self.routes = new if self.routes is None else np.concatenate([self.routes, new])


class ObservationEncoder:
    """Observation -> token ids. ``plain``: the text encoded as it is. ``chat``: the tokens the
    tokenizer's chat template puts between the end of an assistant turn and the next assistant
    turn's start for one ``role`` message (e.g. ``<|im_start|>tool ... <|im_start|>assistant``),
    found by rendering a fixed conversation with and without the message; the ids already in
    the episode are never re-rendered."""

    def __init__(self, tokenizer, chat: bool, role: str = "tool"):
        self.tok, self.chat, self.role = tokenizer, chat, role
        self.eos = tokenizer.eos_token_id
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError("env.render: chat needs a tokenizer with a chat template; use "
                             "env.render=plain")

    def __call__(self, obs, last_token: Optional[int]) -> List[int]:
        obs = check_observation(obs)
        if obs is None or isinstance(obs, list):
            return list(obs or [])
        if not self.chat:
            return list(self.tok.encode(obs, add_special_tokens=False))
        # a turn cut by a token limit has no end-of-turn token: the framing closes it (masked)
        head = [self.eos] if last_token != self.eos and self.eos is not None else []
        return head + list(self.tok.encode(self._between_turns(obs), add_special_tokens=False))

    def _between_turns(self, text: str) -> str:
        base = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
        before = self.tok.apply_chat_template(base, tokenize=False)
        after = self.tok.apply_chat_template(base + [{"role": self.role, "content": text}],
                                             tokenize=False, add_generation_prompt=True)
        end = self.tok.eos_token or ""
        cut = before.rfind(end) + len(end) if end and end in before else -1
        if cut < 0 or not after.startswith(before[:cut]):
            raise ValueError(f"env.render: the tokenizer's chat template re-renders earlier turns "
                             f"when a {self.role!r} message follows (or does not end an assistant "
                             "turn with its eos token); use env.render=plain and format "
                             "observations in the environment")
        return after[cut:]


def _fail(e: Episode, turn: int, where: str, err: BaseException, failure_score: float) -> None:
    e.error = f"turn {turn}: {where}: {type(e.env).__name__}: {type(err).__name__}: {err}"[:500]
    e.done, e.finish, e.reward = True, "error", failure_score


def _finish(e: Episode, turn: int, failure_score: float) -> None:
    """The episode is over: add the environment's final reward."""
    e.done = True
    try:
        bonus = e.env.final_reward()
        if isinstance(bonus, bool) or not isinstance(bonus, (int, float)):
            raise TypeError(f"final_reward() returned {type(bonus).__name__}, not a number")
        e.reward += float(bonus)
    except Exception as err:  # noqa: BLE001 -- user environment code: a failed episode
        _fail(e, turn, "final_reward", err, failure_score)


def _observe(e: Episode, obs, encode: ObservationEncoder, limits: EpisodeLimits) -> None:
    ids = encode(obs, e.token_ids[-1] if e.token_ids else None)
    if limits.vocab_size and any(not 0 <= t < limits.vocab_size for t in ids):
        raise ValueError(f"observation token id outside the vocabulary [0, {limits.vocab_size})")
    if len(ids) > limits.max_obs_tokens:
        ids, e.obs_cut = ids[:limits.max_obs_tokens], e.obs_cut + 1
    ids = ids[:max(e.room(limits), 0)]     # never past max_total_tokens (the episode then ends)
    e.token_ids += ids
    e.action_mask += [0] * len(ids)
    e.logprobs += [0.0] * len(ids)


def _after_action(e: Episode, s: Sample, decode, encode, limits: EpisodeLimits,
                  failure_score: float) -> None:
    """The environment reads turn ``e.turns``'s action; the episode ends or gets its next
    observation (the episode ends ``length`` when no token is left for another turn)."""
    turn = e.turns
    try:
        result = check_step_result(e.env.step(decode(s.token_ids)))
    except Exception as err:  # noqa: BLE001
        return _fail(e, turn, "step", err, failure_score)
    e.reward += float(result.reward)
    e.tool_calls += bool(result.tool_call)
    e.tool_errors += bool(result.tool_error)
    if result.done:
        return _finish(e, turn, failure_score)
    if e.turns >= limits.max_turns or e.room(limits) <= 0:
        e.finish = "turns" if e.turns >= limits.max_turns else "length"
        return _finish(e, turn, failure_score)
    try:
        _observe(e, result.observation, encode, limits)
    except Exception as err:  # noqa: BLE001
        return _fail(e, turn, "observation", err, failure_score)
    if e.room(limits) <= 0:
        e.finish = "length"
        _finish(e, turn, failure_score)


def collect_episodes(drawn: Sequence[Tuple[Any, List[int]]], n: int, make_env: Callable[[Any], Any],
                     generate: GenerateFn, decode: Callable[[List[int]], str],
                     encode: ObservationEncoder, limits: EpisodeLimits, seed: int,
                     failure_score: float = 0.0) -> Tuple[List[List[Sample]], List[List[float]], int, str]:
    """``n`` episodes for each ``(row, prompt ids)`` of ``drawn``, advanced together: one
    ``generate`` call per turn over every live episode. Returns the samples ``[P][G]``, their
    rewards, the number of failed episodes and the first failure's message."""
    eps: List[Episode] = []
    for p, (row, ids) in enumerate(drawn):
        for g in range(n):
            e = Episode(row, list(ids), None, (seed * 1_000_003 + p * 1009 + g) % 2**31)
            eps.append(e)
            try:
                e.env = make_env(row)
                _observe(e, e.env.reset(row), encode, limits)
            except Exception as err:  # noqa: BLE001
                _fail(e, 0, "reset", err, failure_score)
                continue
            if e.room(limits) <= 0:        # the first observation took every response token
                e.finish = "length"
                _finish(e, 0, failure_score)
    while True:
        live = [e for e in eps if not e.done]
        if not live:
            break
        budget = [e.room(limits) if not limits.max_turn_tokens
                  else min(limits.max_turn_tokens, e.room(limits)) for e in live]
        outs = generate([e.prompt_ids + e.token_ids for e in live], budget,
                        [(e.seed + 7919 * e.turns) % 2**31 for e in live])
        for e, s in zip(live, outs):
            e.add_routes(s)
            e.token_ids += s.token_ids
            e.action_mask += [1] * len(s.token_ids)
            e.logprobs += list(s.logprobs)
            e.turns += 1
            _after_action(e, s, decode, encode, limits, failure_score)
    groups = [[eps[p * n + g].sample(p) for g in range(n)] for p in range(len(drawn))]
    rewards = [[eps[p * n + g].reward for g in range(n)] for p in range(len(drawn))]
    failed = [e.error for e in eps if e.error is not None]
    return groups, rewards, len(failed), (failed[0] if failed else "")


def episode_metrics(samples: Sequence[Sample]) -> Dict[str, float]:
    """Sums over episodes (the collector divides by counts): turns, tool calls and errors,
    environment tokens, episodes cut by a limit."""
    out = {"turns": 0.0, "tool_calls": 0.0, "tool_errors": 0.0, "env_tokens": 0.0, "obs_cut": 0.0,
           "tokens": 0.0, "truncated": 0.0, "failed": 0.0, "episodes": 0.0}
    for s in samples:
        info = s.info or {}
        out["episodes"] += 1
        out["tokens"] += len(s.token_ids)
        out["truncated"] += s.finish_reason in ("length", "turns")
        for k in ("turns", "tool_calls", "tool_errors", "env_tokens", "obs_cut", "failed"):
            out[k] += float(info.get(k, 0))
    return out


class EpisodeRunner:
    """The trainer's multi-turn sampler: environments from the ``env`` section, final answers
    scored by the ``reward`` section, observations through ``ObservationEncoder``, the engine's
    ranks kept in step by ``channel`` (``parallel.rollout_comm.EngineChannel``)."""

    def __init__(self, env_name: str, env_params: Dict[str, Any], reward, tokenizer,
                 limits: EpisodeLimits, *, chat: bool, role: str, temperature: float, top_p: float,
                 stop_token_ids: Sequence[int], channel):
        self.env_name, self.env_params, self.reward = env_name, dict(env_params), reward
        self.tok, self.limits, self.channel = tokenizer, limits, channel
        self.encode = ObservationEncoder(tokenizer, chat, role)
        self.sampling = dict(temperature=temperature, top_p=top_p,
                             stop_token_ids=list(stop_token_ids))

    @classmethod
    def from_sections(cls, env, reward, tokenizer, *, max_response_len: int, vocab_size: int,
                      chat_template: bool, temperature: float, top_p: float, channel
                      ) -> "EpisodeRunner":
        """From the ``env`` and ``reward`` config sections (``chat_template``: the data
        section's, which ``env.render: auto`` follows); a tokenizer that cannot render the
        observations is a ``ConfigError`` naming ``env.render``."""
        limits = EpisodeLimits(env.max_turns, max_response_len, env.max_turn_tokens,
                               env.max_obs_tokens, vocab_size=vocab_size)
        chat = env.render == "chat" or (env.render == "auto" and chat_template)
        try:
            return cls(env.name, env.params, reward, tokenizer, limits, chat=chat, role=env.role,
                       temperature=temperature, top_p=top_p,
                       stop_token_ids=(tokenizer.eos_token_id,), channel=channel)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _make_env(self, row):
        r = self.reward
        scorer = Scorer(r.name, dict(r.params), str, r.failure_score,
                        components=tuple(r.component_list()))

        def score_answer(text: str) -> float:
            """The reward section's score of a final answer (raises on a reward failure)."""
            got = scorer(text, row)
            if got.error is not None:
                raise RuntimeError(f"reward {r.name}: {got.error}")
            return got.score

        return make_environment(self.env_name, self.env_params, score=score_answer)

    def collect(self, engine, drawn, n: int, seed: int):
        """On the engine's driving rank: ``collect_episodes`` (turn inputs shared with the
        engine's other ranks); on the others: the same engine calls, and empty results."""
        if not self.channel.driver:
            self.channel.follow(lambda p, m, s: engine.generate_each(p, m, s, **self.sampling))
            return [], [], 0, ""

        def generate(prompts, max_tokens, seeds):
            """One engine call for the live episodes, its inputs shared with the engine's other ranks."""
            self.channel.share((prompts, max_tokens, seeds))
            return engine.generate_each(prompts, max_tokens, seeds, **self.sampling)

        try:
            return collect_episodes(drawn, n, self._make_env, generate,
                                    lambda ids: self.tok.decode(ids, skip_special_tokens=True),
                                    self.encode, self.limits, seed, self.reward.failure_score)
        finally:
            self.channel.share(None)
