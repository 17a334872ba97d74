"""One step's rollouts on this rank: draw prompts, sample G responses each, score them, shape the
rewards, and (DAPO dynamic sampling) keep drawing until enough groups teach something.

Legend: ``P`` groups (prompts) kept, ``G`` responses per group.

Dynamic sampling (Yu et al. 2025): a group whose responses all got the same reward has zero
group-normalised advantage; it costs a forward/backward and teaches nothing. Each round draws
``ceil(missing * oversample)`` new prompts, keeps the groups with a reward spread, and stops when
``groups_needed`` are kept or after ``max_rounds`` (then the step trains on what it kept). The
reward metrics count every sampled response, so the learning curve is the policy's, not the
filter's.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_rl.algo.dapo import dynamic_sampling_keep, overlong_penalty
from megatron_rl.data.prompts import PromptRow
from megatron_rl.rollout.multiturn import episode_metrics
from megatron_rl.rollout.scoring import Scorer

Tensor = torch.Tensor


@dataclass(frozen=True)
class SamplingPlan:
    """How a step samples: plain numbers from the rollout and algo sections."""

    groups_needed: int
    n: int                                   # G
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: Tuple[int, ...] = ()
    ignore_eos: bool = False                 # fixed-length generation (rollout.ignore_eos)
    dynamic: bool = False
    oversample: float = 1.0
    max_rounds: int = 1
    overlong_buffer: int = 0                 # DAPO soft overlong punishment; 0 = off
    overlong_factor: float = 1.0


@dataclass
class Rollouts:
    """The groups kept for training. ``rewards[P, G]`` are shaped (overlong penalty included)."""

    rows: List[PromptRow] = field(default_factory=list)
    samples: List[List[Any]] = field(default_factory=list)   # [P][G] rollout.engine.Sample
    rewards: List[Tensor] = field(default_factory=list)      # P tensors [G]
    # every response sampled this step, kept or not
    all_rewards: List[float] = field(default_factory=list)
    all_lengths: List[int] = field(default_factory=list)
    truncated: int = 0
    failures: int = 0
    first_error: str = ""
    groups_drawn: int = 0
    rounds: int = 0
    episodes: Dict[str, float] = field(default_factory=dict)   # multi-turn sums (episode_metrics)
    components: Dict[str, float] = field(default_factory=dict) # reward components' sums
    flat_groups: int = 0              # groups drawn whose rewards were all equal (no signal)
    prompt_tokens: int = 0            # summed over the groups drawn
    routes_asked: int = 0             # responses whose expert routes were asked of the engine
    routes_missing: int = 0           # ... and came back without (routed live in training)
    skipped_groups: int = 0           # groups with a response the reward service did not score
    service: Dict[str, float] = field(default_factory=dict)   # reward.http call counts (sums)
    fatal: str = ""                   # the reward service is down: the run stops with this line
    model_scores: List[float] = field(default_factory=list)   # the reward model's raw scores

    def metrics(self) -> Dict[str, float]:
        """The step's rollout metrics (``reward/*``, ``response/*``, ``rollout/*``, ``env/*``, ``r3/missing_frac``)."""
        r = torch.tensor(self.all_rewards or [0.0], dtype=torch.float64)
        n = max(len(self.all_lengths), 1)
        out = {"reward/mean": float(r.mean()), "reward/std": float(r.std()) if r.numel() > 1 else 0.0,
               "reward/max": float(r.max()), "reward/failures": float(self.failures),
               "reward/min": float(r.min()),
               "rollout/zero_std_frac": self.flat_groups / max(self.groups_drawn, 1),
               "response/prompt_length_mean": self.prompt_tokens / max(self.groups_drawn, 1),
               "response/length_mean": sum(self.all_lengths) / n,
               "response/length_max": float(max(self.all_lengths or [0])),
               "response/truncated_frac": self.truncated / n,
               "rollout/groups_kept": float(len(self.rows)),
               "rollout/groups_drawn": float(self.groups_drawn), "rollout/rounds": float(self.rounds)}
        if self.rewards:
            out["reward/kept_mean"] = float(torch.cat(self.rewards).mean())
        if self.routes_asked:
            out["r3/missing_frac"] = self.routes_missing / self.routes_asked
        if self.service:
            out.update(service_metrics(self.service, self.skipped_groups))
        if self.model_scores:   # raw, before normalisation: the learning curve against the model
            m = torch.tensor(self.model_scores, dtype=torch.float64)
            out["reward/model_mean"] = float(m.mean())
            out["reward/model_std"] = float(m.std()) if m.numel() > 1 else 0.0
        for name, total in self.components.items():   # every sampled response, like reward/mean
            out[f"reward/{name}/mean"] = total / n
        e = self.episodes
        if e.get("episodes"):
            n_ep = e["episodes"]
            out.update({"env/turns_mean": e["turns"] / n_ep, "env/tool_calls_mean": e["tool_calls"] / n_ep,
                        "env/tool_errors_mean": e["tool_errors"] / n_ep,
                        "env/tool_error_frac": e["tool_errors"] / max(e["tool_calls"], 1.0),
                        "env/env_token_share": e["env_tokens"] / max(e["tokens"], 1.0),
                        "env/truncated_frac": e["truncated"] / n_ep, "env/failed_frac": e["failed"] / n_ep,
                        "env/obs_cut": e["obs_cut"]})
        return out


def service_metrics(sums: Dict[str, float], skipped_groups: int) -> Dict[str, float]:
    """``reward/http_*`` and ``reward/groups_skipped`` from the summed call counts."""
    return {"reward/http_calls": sums.get("http_calls", 0.0),
            "reward/http_failed_calls": sums.get("http_failed_calls", 0.0),
            "reward/http_retries": sums.get("http_retries", 0.0),
            "reward/http_latency_s": sums.get("http_latency_sum_s", 0.0)
            / max(sums.get("http_answered", 0.0), 1.0),
            "reward/groups_skipped": float(skipped_groups)}


def score_groups(scorer: Scorer, rows: Sequence[PromptRow], groups: Sequence[Sequence[Any]]
                 ) -> Tuple[List[List[Optional[float]]], int, str, Dict[str, float]]:
    """Scores ``[P][G]`` of ``groups`` (None: the reward service could not score it), the number
    of rewards that failed, the first error, and each reward component's sum over the responses
    (``{}`` without components). Raises ``rewards.http.ServiceDown`` when the service is down."""
    jobs = [(row, s) for row, g in zip(rows, groups) for s in g]
    texts = [scorer.decode(s.token_ids) for _, s in jobs]
    served = scorer.score_service(texts, [row for row, _ in jobs])

    def one(j: int):
        """One response's reward result."""
        return scorer(texts[j], jobs[j][0], served[j])

    if scorer.workers > 1:
        with ThreadPoolExecutor(scorer.workers) as pool:
            results = list(pool.map(one, range(len(jobs))))
    else:
        results = [one(j) for j in range(len(jobs))]
    errors = [r.error for r in results if r.error is not None]
    flat = [r.score for r in results]
    sizes = [len(g) for g in groups]
    starts = [sum(sizes[:i]) for i in range(len(groups))]
    parts: Dict[str, float] = {}
    for r in results:
        for k, v in (r.parts or {}).items():
            parts[k] = parts.get(k, 0.0) + v
    return ([flat[a:a + n] for a, n in zip(starts, sizes)], len(errors),
            (errors[0] if errors else ""), parts)


def merge_engine_parts(parts: Sequence[Any], n_drawn: int, n_engines: int):
    """Every engine's ``(index, groups, scores, failures, error, component sums, service call
    counts, fatal)`` (``None`` from ranks that do not report) -> ``(groups, scores, failures, first
    error, component sums, service counts, first fatal)`` in draw order (engine ``e`` sampled draws
    ``e, e + n_engines, ...``)."""
    groups, scores, failures, error, fatal = [None] * n_drawn, [None] * n_drawn, 0, "", ""
    sums: Dict[str, float] = {}
    service: Dict[str, float] = {}
    for e, gs, sc, f, err, comp, calls, down in sorted((p for p in parts if p is not None),
                                                       key=lambda p: p[0]):
        groups[e::n_engines], scores[e::n_engines] = gs, sc
        failures += f
        error = error or err
        fatal = fatal or down
        for into, add in ((sums, comp), (service, calls)):
            for k, v in add.items():
                into[k] = into.get(k, 0.0) + v
    return groups, scores, failures, error, sums, service, fatal


# sample(drawn) -> (groups [P][G], scores [P][G], reward failures, first error[, component sums
# [, reward service call counts, fatal[, the reward model's raw scores]]])
SampleFn = Callable[[List[Tuple[PromptRow, List[int]]]], Tuple[List[List[Any]], List[List[float]], int, str]]


def collect_rollouts(draw: Callable[[int], List[Tuple[PromptRow, List[int]]]], sample: SampleFn,
                     plan: SamplingPlan) -> Rollouts:
    """``draw(k)``: the next ``k`` prompts as ``(row, token ids)``; ``sample(drawn)``: their
    ``G`` responses each and raw scores (the trainer spreads this over its engines)."""
    out = Rollouts()
    rounds = plan.max_rounds if plan.dynamic else 1
    for _ in range(rounds):
        missing = plan.groups_needed - len(out.rows)
        if missing <= 0:
            break
        k = math.ceil(missing * plan.oversample) if plan.dynamic else missing
        drawn = draw(k)
        groups, raw, failures, error, *rest = sample(drawn)
        comp, service, fatal, model = (list(rest) + [{}, {}, "", []][len(rest):])[:4]
        out.model_scores += model
        for into, add in ((out.components, comp), (out.service, service)):
            for name, v in add.items():
                into[name] = into.get(name, 0.0) + v
        out.failures += failures
        out.first_error = out.first_error or error
        out.rounds += 1
        if fatal:   # nothing of this round is trained on: the run stops
            out.fatal = fatal
            break
        out.groups_drawn += len(drawn)
        for (row, _), group, scores in zip(drawn, groups, raw):
            _add_group(out, plan, row, group, scores)
    return out


def _add_group(out: Rollouts, plan: SamplingPlan, row: PromptRow, group, scores) -> None:
    lengths = torch.tensor([len(s.token_ids) for s in group])
    skipped = any(x is None for x in scores)   # the reward service did not score all of it
    out.all_rewards += [x for x in scores if x is not None]
    out.flat_groups += not skipped and len(set(scores)) <= 1
    out.prompt_tokens += len(group[0].prompt_ids) if group else 0
    out.all_lengths += lengths.tolist()
    out.truncated += sum(s.finish_reason in ("length", "turns") for s in group)
    out.routes_missing += sum(bool(getattr(s, "routes_missing", False)) for s in group)
    out.routes_asked += sum(getattr(s, "route_key", None) is not None
                            or getattr(s, "routed_experts", None) is not None
                            or bool(getattr(s, "routes_missing", False)) for s in group)
    if group and getattr(group[0], "info", None) is not None:
        for k, v in episode_metrics(group).items():
            out.episodes[k] = out.episodes.get(k, 0.0) + v
    if skipped:   # trained on by no one, never scored zero
        out.skipped_groups += 1
        return
    shaped = torch.tensor(scores, dtype=torch.float32)
    if plan.overlong_buffer:
        shaped = shaped + overlong_penalty(lengths, max_len=plan.max_tokens,
                                           buffer_len=plan.overlong_buffer,
                                           penalty_factor=plan.overlong_factor)
    if len(out.rows) >= plan.groups_needed:
        return
    one_group = torch.zeros(len(group), dtype=torch.long)
    if plan.dynamic and not bool(dynamic_sampling_keep(shaped, one_group).any()):
        return
    out.rows.append(row)
    out.samples.append(group)
    out.rewards.append(shaped)


def sample_rows(rollouts: Rollouts, decode: Callable[[List[int]], str], groups: int) -> List[dict]:
    """The first ``groups`` kept groups as plain rows (prompt, label, response, reward after
    shaping, finish reason) for ``samples.jsonl``: what the policy writes, for people to read."""
    out = []
    for row, group, rewards in list(zip(rollouts.rows, rollouts.samples, rollouts.rewards))[:groups]:
        prompt = row.prompt if isinstance(row.prompt, str) else row.prompt[-1]["content"]
        for s, r in zip(group, rewards.tolist()):
            out.append({"prompt": prompt, "label": None if row.label is None else str(row.label),
                        "response": decode(s.token_ids), "reward": float(r),
                        "finish_reason": s.finish_reason})
    return out
