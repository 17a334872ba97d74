"""The engine's ranks in lock step during multi-turn collection, and the expert routes of a step
sent from the engines that sampled them to the ranks that train on them (``scatter_by_key``).

A vLLM engine of tensor-parallel size ``tp`` spans ``tp`` trainer ranks (external launcher), and
every one of them must make the same ``generate`` calls with the same inputs. Environments run on
the engine's first rank only (a sandboxed tool is not deterministic across processes), which
drives the turns; ``EngineChannel.share`` broadcasts each turn's inputs to the others, and
``follow`` makes the same engine calls until the driver says it is done. No gradient flows here
(host objects), so there is no backward convention to state. Engines proceed independently: the
channel's process group holds one engine's ranks.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence

import torch.distributed as dist

from megatron_rl.parallel.weight_comm import all_gather_objects


class EngineChannel:
    """One engine's ranks kept in step: the driver shares each turn's inputs, the others follow."""
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


def scatter_by_key(local: Dict[Hashable, Any], wanted: Sequence[Hashable],
                   sources: Sequence[int]) -> Dict[Hashable, Any]:
    """The values of the ``wanted`` keys, wherever they are: ``local`` holds the entries this rank
    owns (only ``sources`` own any). Every rank's wanted keys are gathered (small), then each
    source in turn scatters to every rank exactly the entries it asked for, so a rank receives
    its own share and nothing else (no rank ever holds every entry). Collective over the world:
    every rank calls it, wanting nothing or not. Host objects: no backward convention."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: local[k] for k in wanted if k in local}

    asked = all_gather_objects(list(wanted))
    me, got = dist.get_rank(), {}
    for src in sources:
        inputs = [{k: local[k] for k in keys if k in local} for keys in asked] if me == src else None
        box: List[Any] = [None]
        dist.scatter_object_list(box, inputs, src=src)
        got.update(box[0])
    return got
