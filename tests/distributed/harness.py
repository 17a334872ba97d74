"""Run a function in several gloo processes on CPU and bring rank 0's JSON result back.

Spawning costs seconds (each process imports torch), so one spawn runs many checks and returns
their figures; the tests then assert on them one invariant at a time.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_rl.parallel.launch import free_port


def _entry(rank, world, port, out, fn, args):
    torch.set_num_threads(1)
    # what torchrun gives each process (vLLM's external_launcher reads it)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not getattr(fn, "own_world", False):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=180))
    try:
        result = fn(rank, world, *args)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
    finally:
        if dist.is_initialized():  # vLLM's engine shutdown destroys the default group itself
            dist.destroy_process_group()


def own_world(fn):
    """Marks a worker that joins the rendezvous itself (``parallel.roles``: each role its own
    default group) instead of being handed one world's default group."""
    fn.own_world = True
    return fn


# Children fork from one server process that imported these once per test session, instead of
# each importing them afresh (~4.5 s a process with megatron-core; the suite spawns hundreds).
# The server holds no process group, threads or CUDA state when it forks.
PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt",
           "megatron.core.optimizer", "megatron.core.pipeline_parallel", "transformers",
           "tests.distributed.harness"]


def spawn(fn, world: int, *args, timeout_s: float = 3600.0, stall_s: float = 300.0,
          start_method: str = "") -> dict:
    """``fn(rank, world, *args)`` on ``world`` processes; returns what rank 0 returned. A failure
    on any rank raises here with that rank's traceback. A hang is killed and fails instead of
    hanging the suite: processes that together use under a CPU second in ``stall_s`` (blocked),
    or a run past ``timeout_s`` (spinning). The stall test, not a wall-clock budget, is what
    catches a deadlock, so a slow or loaded machine only makes a run slower, never failed (gloo's
    own 180 s timeout catches a collective that one rank never joins). ``start_method`` defaults to the
    preloaded forkserver, or to "spawn" (fresh interpreters, slower) where a GPU is present (a
    forked child cannot re-initialise CUDA); pass "spawn" for checks that depend on how a process
    started."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    shm_before = _shm_segments()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        mp.set_forkserver_preload(PRELOAD)   # takes effect when the server first starts
        ctx = mp.start_processes(_entry, args=(world, free_port(), out, fn, args), nprocs=world,
                                 join=False, start_method=start_method
                                 or ("spawn" if torch.cuda.is_available() else "forkserver"))
        try:
            _join_or_kill(ctx, f"{fn.__name__} on {world} processes", timeout_s, stall_s)
        finally:
            _remove_engine_shm(shm_before)
        with open(out) as f:
            return json.load(f)


def _cpu_seconds(processes) -> float:
    """User + system CPU seconds of ``processes`` and everything they started (engine workers)."""
    total = 0.0
    for p in processes:
        try:
            proc = psutil.Process(p.pid)
            for q in [proc, *proc.children(recursive=True)]:
                t = q.cpu_times()
                total += t.user + t.system
        except psutil.Error:   # exited between the listing and the reading
            pass
    return total


def _join_or_kill(ctx, what: str, timeout_s: float, stall_s: float) -> None:
    """Waits for ``ctx``'s processes; kills them and raises when they stall or outlive the cap."""
    start = last_progress = time.monotonic()
    cpu = _cpu_seconds(ctx.processes)
    while not ctx.join(timeout=5):
        now, used = time.monotonic(), _cpu_seconds(ctx.processes)
        if used > cpu + 1.0:
            cpu, last_progress = used, now
        stalled, over = now - last_progress > stall_s, now - start > timeout_s
        if stalled or over:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{what} " + (f"used no CPU for {stall_s:.0f} s (a deadlock)"
                                             if stalled else f"ran over {timeout_s:.0f} s"))


def _shm_segments() -> set:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def _remove_engine_shm(before: set) -> None:
    """vLLM's CPU engine (TP > 1) names its shared-memory segments after the group, not the
    process (``/dev/shm/-tp:0-[0-1]-cpushm_0``), and unlinks them only when its process exits
    normally. A forkserver child ends in ``os._exit``, so they stay, and the next engine of that
    size (a later test, or a CLI run) fails with "create shm in SHMManager failed. errno: 17"."""
    for name in _shm_segments() - before:
        if "cpushm" in name:
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass
