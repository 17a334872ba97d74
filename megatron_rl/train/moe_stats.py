"""MoE load per layer: tokens routed to each expert during the old-policy pass, as the imbalance
``max / mean`` of the per-expert counts (1.0 = perfectly balanced, E = every token on one expert).

Counted from the routers' routing maps (``[tokens, E]``) with forward hooks, on this rank's
tokens (padding included: BSHD pads share the prompt-end token's route). Reported per layer as a
maximum over ranks.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch

from megatron_rl.runtime.model_setup import unwrap


class RouterLoad:
    """Counts the tokens each expert's router sends it (forward hooks), per MoE layer."""
    def __init__(self, model: List[torch.nn.Module]):
        self.routers = {}
        for chunk in model:
            for layer in getattr(unwrap(chunk).decoder, "layers", []):
                router = getattr(layer.mlp, "router", None)
                if router is not None:
                    self.routers[int(layer.layer_number)] = router
        self.counts: Dict[int, torch.Tensor] = {}
        self._on = False
        for n, router in self.routers.items():
            router.register_forward_hook(self._hook(n))

    def _hook(self, layer: int):
        def fn(module, inputs, output):
            """Add the router's per-expert token counts of this forward while counting."""
            if self._on and isinstance(output, tuple) and len(output) > 1:
                routing_map = output[1].detach()
                c = routing_map.reshape(-1, routing_map.shape[-1]).sum(0).float().cpu()
                self.counts[layer] = self.counts.get(layer, 0) + c
        return fn

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Count inside this context only (the old-policy pass, or the update's)."""
        self.counts, self._on = {}, True
        try:
            yield
        finally:
            self._on = False

    def metrics(self) -> Dict[str, float]:
        """Per layer, the busiest expert's load over the mean (1 is balanced)."""
        out = {}
        for n, c in sorted(self.counts.items()):
            mean = float(c.mean())
            out[f"moe/imbalance_layer{n:02d}/max"] = float(c.max()) / mean if mean > 0 else 0.0
        return out
