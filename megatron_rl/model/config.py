"""The ``model`` config section: which policy network to train.

``kind: toy`` is the pure-PyTorch policy of ``megatron_rl.toy`` (no Megatron needed); the
Megatron-Core MoE kind is added with the model path.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rl.config.fields import field_

MODEL_KINDS = ("toy",)


@dataclass
class ModelConfig:
    kind: str = field_("toy", choices=MODEL_KINDS)
