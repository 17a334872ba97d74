"""Separate placement: one job's world cut into engine ranks and trainer ranks, each role with a
default process group of its own, and the two bridges between the roles.

Global ranks ``[0, E)`` run vLLM engines, ``[E, W)`` train. Megatron-Core and vLLM (its external
launcher) both size their parallel groups from the default group, so each role gets a default
group of its own from the job's rendezvous store (under a role prefix), and ``RANK`` /
``WORLD_SIZE`` are rewritten to the role's. The roles talk over process groups built from the same
store outside any default world:

- ``weights``: trainer rank 0 (bridge rank 0) and every engine rank (bridge rank 1 + engine rank),
  which receive versioned weight buckets by broadcast (``parallel.weight_stream``);
- ``batches``: engine rank 0 (bridge rank 0) and trainer rank 0 (bridge rank 1), for rollout
  batches and control messages, point to point (``send_object`` / ``recv_object``).

The bridges are gloo (host memory) on CPU and GPU alike: on GPU the weight stream leaves NCCL's
device-to-device path unused, which a later change can add as a third bridge.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

ENGINE, TRAINER = "engine", "trainer"


@dataclass
class Roles:
    """Where this process sits: its role, its rank and size inside the role, and the bridges it is
    a member of (None where it is not)."""

    role: str
    rank: int
    size: int
    global_rank: int
    world: int
    engine_ranks: int
    weights: Optional[Any] = None
    batches: Optional[Any] = None
    store: Optional[Any] = None       # kept alive: on global rank 0 it serves everyone's groups

    @property
    def is_engine(self) -> bool:
        """This rank runs a vLLM engine (and no Megatron)."""
        return self.role == ENGINE

    @property
    def leads(self) -> bool:
        """Rank 0 of its role: the one that talks over ``batches``."""
        return self.rank == 0


def role_of(global_rank: int, world: int, engine_ranks: int) -> tuple:
    """``(role, rank in role, role size)`` of ``global_rank``; refuses a split with no trainer or
    no engine rank."""
    if not 0 < engine_ranks < world:
        raise ValueError(f"rollout.engine_ranks={engine_ranks} must leave at least one engine and "
                         f"one trainer rank in a world of {world} (set it between 1 and {world - 1})")
    if global_rank < engine_ranks:
        return ENGINE, global_rank, engine_ranks
    return TRAINER, global_rank - engine_ranks, world - engine_ranks


def init_roles(engine_ranks: int, backend: str = "gloo",
               timeout: timedelta = timedelta(minutes=30)) -> Roles:
    """Join the job's rendezvous (torchrun's environment), then initialise this role's default
    group and the bridges this rank belongs to. ``torch.distributed`` must not be initialised."""
    if dist.is_initialized():
        raise RuntimeError("init_roles: torch.distributed is already initialised")
    store, grank, world = next(dist.rendezvous("env://", timeout=timeout))
    role, rank, size = role_of(grank, world, engine_ranks)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size))   # what vLLM's launcher reads
    dist.init_process_group(backend, store=dist.PrefixStore(f"role/{role}", store), rank=rank,
                            world_size=size, timeout=timeout)
    roles = Roles(role, rank, size, grank, world, engine_ranks, store=store)
    trainer0 = engine_ranks
    if role == ENGINE or grank == trainer0:
        index = 0 if grank == trainer0 else 1 + grank
        roles.weights = dist.ProcessGroupGloo(dist.PrefixStore("bridge/weights", store), index,
                                              engine_ranks + 1, timeout)
    if grank in (0, trainer0):
        roles.batches = dist.ProcessGroupGloo(dist.PrefixStore("bridge/batches", store),
                                              0 if grank == 0 else 1, 2, timeout)
    return roles


def send_object(group, obj: Any, dst: int, tag: int = 0) -> int:
    """Pickle ``obj`` (our own rollout batches and control messages) to bridge rank ``dst``;
    returns the bytes sent. Outside autograd: backward convention none."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)),
                            dtype=torch.uint8)
    group.send([torch.tensor([data.numel()], dtype=torch.int64)], dst, tag).wait()
    group.send([data], dst, tag).wait()
    return int(data.numel())


def recv_object(group, src: int, tag: int = 0) -> Any:
    """What ``send_object`` sent from bridge rank ``src`` (a peer of the same job: trusted)."""
    n = torch.zeros(1, dtype=torch.int64)
    group.recv([n], src, tag).wait()
    data = torch.empty(int(n), dtype=torch.uint8)
    group.recv([data], src, tag).wait()
    return pickle.loads(data.numpy().tobytes())
