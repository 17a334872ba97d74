"""Routing replay for MoE: record which experts each token went to in one forward and force the
same experts in a later one (megatron-core's ``RouterReplay``).

RL compares log-probs from different passes (rollout, old policy, training); in an MoE a tiny
numerical difference can send a token to other experts, and the IS ratio then compares two
different computations. Recording the routes in the old-policy pass and replaying them in the
training forward removes that drift (routes from the rollout engine can be replayed the same way).
Needs ``model.routing_replay`` (megatron-core's ``moe_enable_routing_replay``; router fusion off).
Routes are per MoE layer of this rank's pipeline stage, ``[tokens, top_k]`` in the router's token
order (this rank's sequence / context shard).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch

Tensor = torch.Tensor


def _rr():
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    return RouterReplay, RouterReplayAction


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """Inside, every forward records its routes; ``take_recorded()`` after each forward."""
    rr, action = _rr()
    rr.set_global_router_replay_action(action.RECORD)
    try:
        yield
    finally:
        rr.clear_global_router_replay_action()
        rr.clear_global_indices()


def take_recorded() -> List[Tensor]:
    """The routes of the last forward, one ``[tokens, top_k]`` tensor per local MoE layer."""
    rr, _ = _rr()
    return [t.detach().clone() for t in rr.get_recorded_data()]


@contextlib.contextmanager
def replaying(routes: List[Tensor]) -> Iterator[None]:
    """Forwards inside use ``routes`` instead of the router's own top-k (the router's scores still
    weight the chosen experts, so gradients reach the router)."""
    rr, action = _rr()
    rr.set_replay_data(routes)
    rr.set_global_router_replay_action(action.REPLAY_FORWARD)
    try:
        yield
    finally:
        rr.clear_global_router_replay_action()
        rr.clear_global_indices()  # the upstream backward-replay list grows with every set
