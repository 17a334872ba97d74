"""One run per output directory: an exclusive lock held for the run's whole life.

The lock is a directory, ``<output_dir>/.lock``, created with ``mkdir``: creating a directory is
atomic on every filesystem a cluster uses (local disks, NFS v2-v4, Lustre, GPFS), where ``flock``
and ``fcntl`` locks are not always honoured (Lustre mounted without ``-o flock``, NFS without a
lock daemon). Inside, ``holder.json`` names the holder (host, pid, process start time, run id)
and a heartbeat counter that a thread advances every ``HEARTBEAT_S`` seconds.

A lock left by a dead run (kill -9, a node lost) is taken over:
- on the same host, at once, when the holder's pid is gone or now belongs to a process started
  at another time (pid reuse);
- from another host, only when its heartbeat has not moved for ``STALE_S`` seconds of our own
  watching. Counting beats, not comparing file times, keeps the decision free of clock skew
  between nodes.
Taking over renames the stale lock away (atomic; of two processes racing for it, one rename
fails) and checks that what it renamed is the lock it judged stale, so a fresh lock is never
stolen.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from megatron_rl.runtime.preempt import process_start_ticks

LOCK_DIR = ".lock"
HOLDER = "holder.json"
HEARTBEAT_S = 5.0
STALE_S = 30.0


class RunDirBusy(ValueError):
    """Another live run holds the output directory (the message names it)."""


def new_run_id() -> str:
    """A fresh run id: start time and a random suffix."""
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]


def _read(lock: Path) -> Optional[dict]:
    try:
        return json.loads((lock / HOLDER).read_text())
    except (OSError, ValueError):
        return None


def _describe(h: Optional[dict]) -> str:
    if not h:
        return "a run whose lock file is unreadable"
    return (f"run {h.get('run_id')} (pid {h.get('pid')} on {h.get('host')}, started "
            f"{h.get('started')})")


class RunLock:
    """``acquire()`` or raise ``RunDirBusy``; ``release()`` at the end of the run."""

    def __init__(self, run_dir: os.PathLike, run_id: str, stale_s: float = STALE_S,
                 heartbeat_s: float = HEARTBEAT_S):
        self.dir = Path(run_dir)
        self.lock = self.dir / LOCK_DIR
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        self.me = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                   "pid_start": process_start_ticks(os.getpid()),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "beat": 0}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> None:
        """Take the output directory's lock (a dead holder's is taken over); a live holder is
        ``RunLocked``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):   # a takeover race lost: look again
            try:
                os.mkdir(self.lock)
            except FileExistsError:
                holder = self._live_holder()
                if holder is not None:
                    raise RunDirBusy(
                        f"{self.dir}: in use by {_describe(holder)}; wait for it to end, stop it "
                        f"(touch {self.dir / 'STOP'}), or choose another train.output_dir") from None
                continue
            self._write()
            self._thread = threading.Thread(target=self._beat, daemon=True, name="run-lock")
            self._thread.start()
            return
        raise RunDirBusy(f"{self.dir}: another process keeps taking the lock {self.lock}; "
                         "choose another train.output_dir")

    def _write(self) -> None:
        tmp = self.lock / f".{HOLDER}.{os.getpid()}"
        tmp.write_text(json.dumps(self.me))
        os.replace(tmp, self.lock / HOLDER)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.me["beat"] += 1
            try:
                self._write()
            except OSError:
                pass  # a full disk must not kill the run here; the writes that matter report it

    def _live_holder(self) -> Optional[dict]:
        """The holder if it is alive; None after taking a stale lock away (the caller retries)."""
        seen = _read(self.lock)
        if seen is None:  # being created this instant, or a holder that died before writing
            time.sleep(max(1.0, self.heartbeat_s))
            seen = _read(self.lock)
        if seen is not None and seen.get("host") == self.me["host"]:
            start = process_start_ticks(int(seen.get("pid", -1)))
            if start is not None and start == seen.get("pid_start"):
                return seen
        elif seen is not None:
            deadline = time.monotonic() + self.stale_s
            while time.monotonic() < deadline:
                time.sleep(min(self.heartbeat_s, self.stale_s))
                now = _read(self.lock)
                if now is None or now != seen:
                    return now if now is not None else None
        # here: a dead holder, or none that wrote its file within a heartbeat (died creating it)
        self._take_over(seen)
        return None

    def _take_over(self, seen: Optional[dict]) -> None:
        aside = self.dir / f"{LOCK_DIR}.stale-{self.me['run_id']}"
        try:
            os.rename(self.lock, aside)
        except OSError:
            return   # someone else took it first
        if _read(aside) != seen:   # we renamed a fresh lock: give it back
            try:
                os.rename(aside, self.lock)
            except OSError:
                pass
            return
        for f in aside.iterdir():
            f.unlink(missing_ok=True)
        aside.rmdir()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 1)
            self._thread = None
            if (_read(self.lock) or {}).get("run_id") == self.me["run_id"]:
                for f in self.lock.iterdir():
                    f.unlink(missing_ok=True)
                self.lock.rmdir()
