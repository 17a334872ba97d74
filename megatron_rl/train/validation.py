"""Validation during training: every ``train.val_every`` steps the engine (just synced with the
trainer's weights) answers the first ``train.val_prompts`` rows of ``data.val_path``,
``train.val_n`` times each at ``train.val_temperature``, and the run's reward scores them.

Metrics: ``val/reward_mean`` over all responses, ``val/pass@k`` (k = ``val_n``: the share of
prompts with at least one response scoring 1 or more, as verl's and TRL's math evaluations count
a solved problem), ``val/response_length_mean``. Generation is spread over the engines like the
step's rollouts, so every rank gets the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

from megatron_rl.config import ConfigError
from megatron_rl.data.prompts import render_prompt
from megatron_rl.rollout.collect import SamplingPlan


@dataclass
class Validation:
    """The validation prompts and how they are sampled (``n``, temperature, length)."""
    drawn: List[Tuple[object, List[int]]]     # (row, prompt token ids)
    n: int
    temperature: float
    max_tokens: int
    eos: int

    @classmethod
    def of(cls, cfg, tokenizer, rows) -> "Validation":
        """From the config, the tokenizer and the validation rows (prompts rendered once)."""
        if cfg.train.val_prompts:
            rows = rows[:cfg.train.val_prompts]
        try:
            drawn = [(row, render_prompt(row, tokenizer, chat=cfg.data.chat_template,
                                         max_tokens=cfg.rollout.max_prompt_len)) for row in rows]
        except ValueError as e:
            raise ConfigError(f"data.val_path: {e}") from None
        return cls(drawn, cfg.train.val_n, cfg.train.val_temperature,
                   cfg.rollout.max_response_len, tokenizer.eos_token_id)

    def run(self, sample: Callable, step: int) -> Dict[str, float]:
        """``sample(drawn, plan, round)`` is the trainer's engine-sharded generate-and-score."""
        plan = SamplingPlan(groups_needed=len(self.drawn), n=self.n, max_tokens=self.max_tokens,
                            temperature=self.temperature, top_p=1.0, stop_token_ids=(self.eos,))
        groups, scores, failures, _, *_ = sample(self.drawn, plan, 1_000_000 + step)
        return val_metrics(scores, [[len(s.token_ids) for s in g] for g in groups], failures)


def val_metrics(scores: List[List[float]], lengths: List[List[int]], failures: int,
                solved: float = 1.0) -> Dict[str, float]:
    """``val/*`` from the validation scores and lengths (a score None, which a reward service
    could not give, counts as neither solved nor failed-to-zero: it is left out)."""
    scores = [[s for s in (g or []) if s is not None] for g in scores]
    flat = [s for g in scores for s in g]
    k = max((len(g) for g in lengths), default=0)
    lens = [n for g in lengths for n in g]
    return {"val/reward_mean": sum(flat) / max(len(flat), 1),
            f"val/pass@{k}": sum(max(g) >= solved for g in scores if g) / max(len(scores), 1),
            "val/response_length_mean": sum(lens) / max(len(lens), 1),
            "val/failures": float(failures)}
