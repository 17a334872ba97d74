"""The ``train`` config section: the step schedule and the optimizer."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rl.config.fields import field_


@dataclass
class TrainConfig:
    steps: int = field_(100, ge=1, help="RL steps: one rollout batch each")
    prompts_per_step: int = field_(32, ge=1)
    updates_per_step: int = field_(1, ge=1, help="optimizer updates (mini-batches) per rollout batch")
    micro_batch_size: int = field_(8, ge=1, help="responses per forward/backward")
    lr: float = field_(1e-6, gt=0.0)
    weight_decay: float = field_(0.0, ge=0.0)
    max_grad_norm: float = field_(1.0, gt=0.0)
    seed: int = 1234
    output_dir: str = "runs/default"
    log_every: int = field_(1, ge=1)
