"""Joining the job's process group: under torchrun (its environment) or as a single process."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on this host now (for a single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> int:
    """Initialise ``torch.distributed`` once (NCCL with a GPU per local rank, else gloo) and return
    the world size. Without torchrun's ``RANK``/``WORLD_SIZE`` it is a world of one."""
    if dist.is_initialized():
        return dist.get_world_size()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if gpu else "gloo")
    return dist.get_world_size()


def shutdown_distributed() -> None:
    """Destroy the default process group if one is up."""
    if dist.is_initialized():
        dist.destroy_process_group()
