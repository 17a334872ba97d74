"""Expert routes of the MoE policy: record those of one forward and replay them in a later one
(``train.routing_replay: old``, R2), replay the rollout engine's (``rollout``, R3), and measure how
often Megatron's live router agrees with the engine's.

RL compares log-probs from different passes (engine, old policy, training); in an MoE a tiny
numerical difference sends a token to other experts, and the IS ratio then compares two different
computations. Replay forces the discrete choice only: the gate weights come from the live
router's full score vector, gathered at the replayed experts (a replayed expert outside the live
top-k still gets a non-zero gate and a gradient), then normalised as the router's score function
says.

One ``RouteReplayer`` per MoE router stands in for megatron-core's ``RouterReplay``: the router
calls ``router_replay.get_replay_topk(scores, topk, num_groups, group_topk, compute_topk)``
whenever that attribute is set (megatron-core 0.16 to 0.19), so no global state is involved and
each model (policy, critic) has its own ``RouteControl``.

Legend: ``N`` tokens this rank routes, in the router's order (this CP rank's shard, then its
sequence-parallel share; BSHD ``[s, b]`` position-major, flattened), ``L`` MoE layers of this
pipeline stage, ``K`` top-k. A route tensor is int16 ``[N, L, K]``; a row of -1 means no route is
known (padding, the last sampled token, a sequence the engine returned without routes) and that
token is routed live.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence

import torch

Tensor = torch.Tensor
UNKNOWN = -1


class RouteControl:
    """What this stage's routers do in the current forward: replay ``replay`` (or route live),
    compare their live choice with ``compare`` (the engine's routes; sums in ``agreement``), and
    record the routes used (``record``). ``layers``: the global MoE-layer indices of this stage's
    routers, in local order (column ``i`` of a route tensor is ``layers[i]``)."""

    def __init__(self, layers: Sequence[int]):
        self.layers = tuple(layers)
        self.replay: Optional[Tensor] = None
        self.compare: Optional[Tensor] = None
        self.record = False
        self.recorded: Dict[int, Tensor] = {}
        self.agreement: Optional[Tensor] = None   # float64 [2]: matching slots, compared slots

    @contextlib.contextmanager
    def active(self, *, replay: Optional[Tensor] = None, compare: Optional[Tensor] = None,
               record: bool = False) -> Iterator[None]:
        """Inside, forwards replay / compare / record as asked; everything resets after."""
        self.replay, self.compare, self.record, self.recorded = replay, compare, record, {}
        try:
            yield
        finally:
            self.replay, self.compare, self.record = None, None, False

    def merge_recorded(self, into: Optional[Tensor]) -> Tensor:
        """The routes recorded in the last forward written into ``into`` (``[N, L, K]``; a new
        tensor of -1 when None): a virtual-pipeline chunk records only its own layers (or none)."""
        if not self.recorded:
            return into
        first = next(iter(self.recorded.values()))
        if into is None:
            into = torch.full((first.shape[0], len(self.layers), first.shape[1]), UNKNOWN,
                              dtype=torch.int16, device=first.device)
        for i, idx in self.recorded.items():
            into[:, i] = idx
        self.recorded = {}
        return into

    def take_agreement(self) -> Optional[Tensor]:
        """``[matching slots, compared slots]`` summed since the last call (None: none compared)."""
        out, self.agreement = self.agreement, None
        return out

    def agreement_metrics(self) -> Dict[str, Tensor]:
        """``take_agreement`` as the step's raw sums (``r3/agree_slots``, ``r3/slots``; summed
        over ranks, each of which routes other tokens; ``step_metrics.derive`` divides)."""
        got = self.take_agreement()
        return {} if got is None else {"r3/agree_slots": got[0], "r3/slots": got[1]}

    def _count(self, live: Tensor, engine: Tensor, known: Tensor) -> None:
        hit = (live[:, :, None] == engine[:, None, :]).any(1) & known[:, None]      # [N, K]
        add = torch.stack([hit.sum(), known.sum() * engine.shape[1]]).double()
        self.agreement = add if self.agreement is None else self.agreement + add


class RouteReplayer:
    """The ``router_replay`` of one MoE router: column ``index`` of the control's tensors."""

    def __init__(self, control: RouteControl, index: int):
        self.control, self.index = control, index
        self.layer_number = None   # megatron-core 0.19 sets it on whatever sits here

    def get_replay_topk(self, scores: Tensor, topk: int, num_groups: Optional[int] = None,
                        group_topk: Optional[int] = None, default_compute_topk=None):
        """``(values, indices [N, K])``: the live top-k, or the replayed experts where a route is
        known; ``values`` are ``scores`` gathered at the chosen experts (the full score vector:
        nothing outside the live top-k is masked)."""
        c = self.control
        values, idx = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        for name, routes in (("compare", c.compare), ("replay", c.replay)):
            if routes is not None and routes.shape[0] != scores.shape[0]:
                raise ValueError(f"routing replay: the {name} routes hold {routes.shape[0]} tokens "
                                 f"but MoE layer {c.layers[self.index]} routes {scores.shape[0]} "
                                 "on this rank (routes sliced for another layout)")
        if c.compare is not None:
            engine = c.compare[:, self.index].to(device=idx.device, dtype=torch.long)
            c._count(idx, engine, engine[:, 0] != UNKNOWN)
        if c.replay is not None:
            target = c.replay[:, self.index].to(device=idx.device, dtype=torch.long)
            idx = torch.where(target[:, :1] != UNKNOWN, target, idx)
            values = scores.gather(1, idx)
        if c.record:
            c.recorded[self.index] = idx.detach().to(torch.int16)
        return values, idx


def moe_routers(chunks: Sequence[torch.nn.Module]) -> List[tuple]:
    """``(global layer index, router)`` of every MoE layer in ``chunks`` (GPTModels, unwrapped),
    in layer order."""
    out = []
    for chunk in chunks:
        for layer in getattr(getattr(chunk, "decoder", None), "layers", []):
            router = getattr(getattr(layer, "mlp", None), "router", None)
            if router is not None:
                out.append((int(layer.layer_number) - 1, router))
    return sorted(out, key=lambda x: x[0])


def install_route_replay(chunks: Sequence[torch.nn.Module],
                         moe_layers: Sequence[int]) -> Optional[RouteControl]:
    """One ``RouteControl`` for this stage's MoE routers (None for a dense model or stage),
    attached to every chunk as ``route_control``. ``moe_layers``: the model's MoE layers (global
    0-based indices, ``HFModel.moe_layers``); route tensors index them in that order."""
    routers = moe_routers(chunks)
    if not routers:
        return None
    index = {layer: i for i, layer in enumerate(moe_layers)}
    missing = [layer for layer, _ in routers if layer not in index]
    if missing:
        raise ValueError(f"layer {missing[0]} has a router but the model config says it is dense")
    control = RouteControl([index[layer] for layer, _ in routers])
    for i, (_, router) in enumerate(routers):
        if getattr(router.config, "moe_router_fusion", False):
            raise ValueError("routing replay needs moe_router_fusion=False (the fused router "
                             "has no replay hook)")
        router.router_replay = RouteReplayer(control, i)
    for chunk in chunks:
        chunk.route_control = control
    return control


def route_control(chunk: torch.nn.Module) -> Optional[RouteControl]:
    """The ``RouteControl`` of a model chunk (DDP-wrapped or not), or None."""
    return getattr(getattr(chunk, "module", chunk), "route_control", None)
