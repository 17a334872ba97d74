"""The ``parallel`` config section: Megatron-Core's parallel layout, and its world-size rules."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rl.config.fields import ConfigError, field_


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = field_(1, ge=1)
    pipeline_model_parallel_size: int = field_(1, ge=1)
    context_parallel_size: int = field_(1, ge=1)
    expert_model_parallel_size: int = field_(1, ge=1)
    expert_tensor_parallel_size: int = field_(1, ge=1)
    sequence_parallel: bool = False

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for ``world_size`` ranks; raises ``ConfigError`` if the layout cannot tile it."""
        tp, pp, cp = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                      self.context_parallel_size)
        if world_size % (tp * pp * cp):
            raise ConfigError(
                f"parallel: world size {world_size} is not divisible by tensor x pipeline x context "
                f"parallel = {tp} x {pp} x {cp} = {tp * pp * cp}; change the sizes or the GPU count")
        ep, etp = self.expert_model_parallel_size, self.expert_tensor_parallel_size
        if world_size % (ep * etp * pp):
            raise ConfigError(
                f"parallel: world size {world_size} is not divisible by expert x expert-tensor x "
                f"pipeline parallel = {ep} x {etp} x {pp}; change "
                "parallel.expert_model_parallel_size or parallel.expert_tensor_parallel_size")
        return world_size // (tp * pp * cp)
