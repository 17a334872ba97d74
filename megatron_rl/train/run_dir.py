"""Claiming the output directory at the start of a run, before anything is built or written: the
run's id, the directory's lock (``run_lock``), and the stop watch (``preempt``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from megatron_rl.parallel.weight_comm import all_gather_objects
from megatron_rl.runtime.preempt import REQUEUE_FILE, StopRequest, own_request_id
from megatron_rl.runtime.run_lock import RunDirBusy, RunLock, new_run_id


def claim_output_dir(out: Path, rank: int, grace_s: float) -> Tuple[str, Optional[RunLock], StopRequest]:
    """Collective. Rank 0 makes the run id and takes the lock; one all-gather tells every rank
    both (a refusal raises ``RunDirBusy`` everywhere, naming the holder). Then every rank watches
    for stops, and rank 0 clears the previous run's stale STOP and its REQUEUE answer. Returns
    ``(run_id, lock or None off rank 0, stop)``; the caller releases the lock at the end."""
    run_id, lock, refused = "", None, ""
    if rank == 0:
        run_id = new_run_id()
        try:
            lock = RunLock(out, run_id)
            lock.acquire()
        except RunDirBusy as e:
            lock, refused = None, str(e)
    run_id, refused = all_gather_objects((run_id, refused))[0]
    if refused:
        raise RunDirBusy(refused)
    stop = StopRequest(out / "STOP", grace_s, request_id=own_request_id())
    if rank == 0:
        stop.discard_stale()
        (out / REQUEUE_FILE).unlink(missing_ok=True)
    return run_id, lock, stop
