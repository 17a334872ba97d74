"""The pure parts of a learned reward model's scoring: what it reads, and how its scores are shaped.

Legend: ``N`` responses scored in a round.

* **Input.** The reward model has its own tokenizer and chat template, which need not be the
  policy's, so a response is re-tokenised from text: the conversation (the prompt's messages,
  or one user message, then the response as the assistant's) through the reward model's chat
  template, or prompt + response text through its tokenizer (``use_chat_template`` false, or
  no template). The score is read where transformers' ``*ForSequenceClassification`` reads it:
  at the last token that is not the model's ``pad_token_id`` (``scored_length``).
* **Shaping.** ``normalize: running``: ``(s - mean) / sqrt(var + eps)`` over every score seen
  so far, this round's included (Welford moments, merged per round: ``RunningMoments``); then
  an optional clip to ``[-clip, clip]``. The raw scores are what ``reward/model_mean|std`` log.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch

Tensor = torch.Tensor
EPS = 1e-8   # in the normaliser's variance: a round of equal scores divides by sqrt(eps), not 0


def conversation(prompt: Any, response: str) -> List[Dict[str, str]]:
    """The chat the reward model judges: the prompt's messages (or one user message) and the
    response as the assistant's turn."""
    messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    return messages + [{"role": "assistant", "content": response}]


def rm_token_ids(tokenizer, prompt: Any, response: str, use_chat_template: bool) -> List[int]:
    """The reward model's token ids of ``prompt`` + ``response`` (see the module doc)."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(conversation(prompt, response), tokenize=True,
                                            add_generation_prompt=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):   # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    if isinstance(prompt, list):   # chat rows without a template: the messages' text in order
        prompt = "\n".join(str(m.get("content", "")) for m in prompt)
    return [int(t) for t in tokenizer(str(prompt) + response, add_special_tokens=True)["input_ids"]]


def scored_length(ids: Sequence[int], pad_token_id: Optional[int]) -> int:
    """How many leading tokens the score reads: through the last token that is not
    ``pad_token_id`` (transformers' rule; 1 when every token is padding, as its argmax of zeros
    reads the first). Later tokens cannot change a causal model's output there."""
    if pad_token_id is None:
        return len(ids)
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] != pad_token_id:
            return i + 1
    return 1


class RunningMoments:
    """Count, mean and sum of squared deviations of every score so far (Chan et al.'s parallel
    Welford merge, in float64), with its checkpoint state."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: Tensor) -> None:
        """Merge the scores ``x [N]`` into the moments."""
        n = int(x.numel())
        if n == 0:
            return
        x = x.detach().double()
        mean, m2 = float(x.mean()), float(((x - x.mean()) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    @property
    def var(self) -> float:
        """The population variance of every score so far (0 before any)."""
        return self.m2 / self.count if self.count else 0.0

    def state_dict(self) -> Dict[str, float]:
        """What a checkpoint keeps."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        """Back from ``state_dict``."""
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def shape_scores(raw: Tensor, moments: Optional[RunningMoments], clip: float,
                 update: bool = True) -> Tensor:
    """``raw [N]`` normalised by ``moments`` after merging them in (``update`` False: as they
    stand, for validation; None: not normalised), then clipped to ``[-clip, clip]`` (``clip`` 0:
    not clipped). Returns float64."""
    out = raw.double()
    if moments is not None:
        if update:
            moments.update(out)
        out = (out - moments.mean) / math.sqrt(moments.var + EPS)
    if clip > 0:
        out = out.clamp(-clip, clip)
    return out
