"""The ``rollout`` config section: how many samples per prompt and how they are drawn."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rl.config.fields import field_


@dataclass
class RolloutConfig:
    n_samples_per_prompt: int = field_(8, ge=1, help="G: responses per prompt (the group)")
    max_response_len: int = field_(1024, ge=1)
    temperature: float = field_(1.0, gt=0.0)
    top_p: float = field_(1.0, gt=0.0, le=1.0)
    seed: int = 0
