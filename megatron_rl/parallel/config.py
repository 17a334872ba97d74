"""The ``parallel`` config section, the resolved ``Layout`` of sizes, and the world-size rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from megatron_rl.fields import ConfigError, field_


@dataclass(frozen=True)
class Layout:
    """Parallel sizes; ``etp`` (expert tensor parallel) defaults to ``tp``, as in Megatron-LM."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: Optional[int] = None
    sequence_parallel: bool = False

    @property
    def expert_tp(self) -> int:
        """The experts' tensor-parallel size (the dense TP unless set)."""
        return self.tp if self.etp is None else self.etp

    def sizes(self, world_size: int) -> Dict[str, int]:
        """Every parallel size on ``world_size`` ranks, DP included (what checkpoints record)."""
        return {"tp": self.tp, "pp": self.pp, "cp": self.cp, "ep": self.ep, "etp": self.expert_tp,
                "dp": world_size // (self.tp * self.pp * self.cp)}


def check_layout(layout: Layout, world_size: int) -> int:
    """Raise ``ValueError`` naming the sizes if ``layout`` cannot tile ``world_size``; returns DP."""
    dense = layout.tp * layout.pp * layout.cp
    if world_size % dense:
        raise ValueError(
            f"parallel: world size {world_size} is not divisible by tensor x pipeline x context "
            f"parallel = {layout.tp} x {layout.pp} x {layout.cp} = {dense}; change the sizes or "
            "the GPU count")
    expert = layout.ep * layout.expert_tp * layout.pp
    if world_size % expert:
        raise ValueError(
            f"parallel: world size {world_size} is not divisible by expert x expert-tensor x "
            f"pipeline parallel = {layout.ep} x {layout.expert_tp} x {layout.pp} = {expert}; change "
            "parallel.expert_model_parallel_size or parallel.expert_tensor_parallel_size")
    if layout.ep == 1 and layout.expert_tp != layout.tp:
        # megatron-core 0.16 then treats expert weights as dense: their gradients are reduced over
        # DP only, not over the TP ranks that each routed a different share of the tokens
        raise ValueError(
            f"parallel.expert_tensor_parallel_size={layout.expert_tp} must equal "
            f"tensor_model_parallel_size={layout.tp} when expert_model_parallel_size is 1 "
            "(leave it unset, or use expert parallelism)")
    return world_size // dense


@dataclass
class ParallelConfig:
    """The ``parallel`` section: TP / PP / EP / CP sizes and sequence parallelism."""
    tensor_model_parallel_size: int = field_(1, ge=1, help="TP: each layer's weights split "
                                             "over this many ranks (vocab too)")
    pipeline_model_parallel_size: int = field_(1, ge=1, help="PP: the layers split into stages")
    context_parallel_size: int = field_(1, ge=1, help="CP: each sequence split over this many "
                                        "ranks (zigzag chunks), the loss included")
    expert_model_parallel_size: int = field_(1, ge=1, help="EP: the experts split over ranks")
    expert_tensor_parallel_size: Optional[int] = field_(None, ge=1, help="default: the TP size")
    sequence_parallel: bool = field_(False, help="Megatron sequence parallelism over the TP group "
                                     "(activations outside attention / MLP split by token)")

    def layout(self) -> Layout:
        """The ``Layout`` these settings give."""
        return Layout(self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                      self.context_parallel_size, self.expert_model_parallel_size,
                      self.expert_tensor_parallel_size, self.sequence_parallel)

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for ``world_size`` ranks; raises ``ConfigError`` if the layout cannot tile it."""
        try:
            return check_layout(self.layout(), world_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
