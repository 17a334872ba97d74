"""The frozen reference policy as a host-memory copy of the base weights, swapped in for the
reference log-prob pass: no second model and no device memory beyond the trained weights.

Each rank keeps its own shard (TP/PP/EP slices of this rank's parameters); swapping copies in
place, so DDP buffers and the optimizer's parameter views stay valid, and the optimizer's fp32
main weights are not touched.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
    return out.copy_(t.detach())


class HostWeights:
    """A snapshot of ``model``'s parameters (a list of model chunks) in host memory."""

    def __init__(self, model: List[torch.nn.Module]):
        self._params = [p for chunk in model for p in chunk.parameters()]
        self._saved = [_host_copy(p) for p in self._params]

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside, the model computes with the snapshot; on exit the current weights return,
        bit for bit."""
        current = [_host_copy(p) for p in self._params]
        try:
            with torch.no_grad():
                for p, w in zip(self._params, self._saved):
                    p.copy_(w, non_blocking=True)
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self._params, current):
                    p.copy_(w, non_blocking=True)
