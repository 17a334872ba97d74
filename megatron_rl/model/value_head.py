"""The critic: megatron-core's ``GPTModel`` trunk with a scalar value head instead of the LM head.

``ValueHead`` replaces ``GPTModel.output_layer`` on the last pipeline stage; ``GPTModel`` then
returns ``[b, s, 1]`` values where it returned logits, so the trunk, its TP / PP / EP / CP layout,
its checkpointing and the schedule are the policy's, unchanged.

The head is replicated over TP. Under sequence parallelism its input is gathered along the
sequence first, with a backward that keeps this rank's slice and does not sum: every TP rank
computes the same values and the same loss, so summing would count the gradient TP times. For
the same reason its parameters are not marked ``sequence_parallel`` (their gradients are already
equal on the TP ranks).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


class ValueHead(torch.nn.Module):
    """``hidden [s(/tp), b, h] -> values [s, b, 1]``, called like megatron's output layer."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, sequence_parallel: bool, tp_group,
                 init_std: float = 0.0, bias: bool = True):
        super().__init__()
        # ``weight`` / ``bias`` by those names: megatron's LanguageModule checkpoints the head
        # as ``output_layer.weight``; a reward model's ``score`` layer has no bias
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype)) if bias else None
        if init_std > 0:   # else values start at 0 and the first updates move the head first
            with torch.no_grad():
                self.weight.normal_(0.0, init_std)
        self.sequence_parallel = sequence_parallel   # read by GPTModel's inference path
        self.tp_group = tp_group

    def forward(self, hidden_states: Tensor, weight=None, runtime_gather_output=None):
        """One value per token from the final hidden states (gathered first under sequence
        parallelism)."""
        if self.sequence_parallel:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.tp_group)
        return torch.nn.functional.linear(hidden_states, self.weight, self.bias), None


def attach_value_head(model, config, init_std: float = 0.0, bias: bool = True):
    """Swap ``model.output_layer`` (the last stage's LM head) for a ``ValueHead``; other stages
    have no head and are returned as they are."""
    if not getattr(model, "post_process", False):
        return model
    from megatron.core import parallel_state as ps

    model.output_layer = ValueHead(config.hidden_size, config.params_dtype, config.sequence_parallel,
                                   ps.get_tensor_model_parallel_group(), init_std, bias)
    return model
