"""The engine's ranks in lock step during multi-turn collection.

A vLLM engine of tensor-parallel size ``tp`` spans ``tp`` trainer ranks (external launcher), and
every one of them must make the same ``generate`` calls with the same inputs. Environments run on
the engine's first rank only (a sandboxed tool is not deterministic across processes), which
drives the turns; ``EngineChannel.share`` broadcasts each turn's inputs to the others, and
``follow`` makes the same engine calls until the driver says it is done. No gradient flows here
(host objects), so there is no backward convention to state. Engines proceed independently: the
channel's process group holds one engine's ranks.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch.distributed as dist


class EngineChannel:
    def __init__(self, rank: int, world: int, engine_tp: int):
        self.tp = engine_tp
        self.leader = rank - rank % engine_tp
        self.driver = rank == self.leader
        self.group = None
        if engine_tp > 1:
            # every rank creates every engine's group (new_group is collective); gloo carries
            # pickled objects on CPU and GPU alike
            for start in range(0, world, engine_tp):
                g = dist.new_group(list(range(start, start + engine_tp)), backend="gloo")
                if start == self.leader:
                    self.group = g

    def share(self, obj: Any) -> Any:
        """The driver's ``obj`` on every rank of this engine (``None`` ends a ``follow``)."""
        if self.group is None:
            return obj
        box: List[Optional[Any]] = [obj if self.driver else None]
        dist.broadcast_object_list(box, src=self.leader, group=self.group)
        return box[0]

    def follow(self, call: Callable[..., Any]) -> None:
        """Non-driver ranks: ``call(*args)`` for every turn the driver shares, until ``None``."""
        while True:
            args = self.share(None)
            if args is None:
                return
            call(*args)
