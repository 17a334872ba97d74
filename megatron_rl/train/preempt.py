"""Stopping at a safe point: SIGTERM / SIGUSR1 (SLURM's warning before a kill) or a stop file.

The handler only records the request; the trainer checks it between steps (every rank agrees
through one MAX all-reduce), writes a checkpoint, and exits with ``EXIT_REQUEUE`` so that
``launch/slurm.sbatch`` requeues the job, which resumes from that checkpoint. The stop file
(``<output_dir>/STOP``) is for launchers that cannot deliver a signal to every rank: the sbatch
script's trap creates it on the shared filesystem, and a watcher thread notices it within a second.

torchrun reports a worker's exit status 75 as its own status 1, so the status alone does not
reach the launcher: a stop on request also leaves ``<output_dir>/REQUEUE``, which the launch
scripts check (and the trainer removes when it starts).

The grace period (``train.preempt_grace_s``, counted from the request) bounds the wait: SLURM
kills the job when its warning time is up, whatever it is doing. If the step in progress and the
checkpoint cannot finish inside it, a watchdog exits with ``EXIT_REQUEUE`` at its end, before the
kill: the checkpoint being written is never renamed into place, so the requeued job resumes from
the previous complete one.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

EXIT_REQUEUE = 75   # EX_TEMPFAIL: "stopped on request, try again"
EXIT_NONFINITE = 3  # train.max_bad_steps steps in a row had NaN/Inf: requeueing would not help
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


REQUEUE_FILE = "REQUEUE"


def mark_requeue(run_dir: Path, text: str) -> None:
    """Leave ``<run_dir>/REQUEUE`` for the launcher (any rank may call it; last writer wins)."""
    try:
        (Path(run_dir) / REQUEUE_FILE).write_text(text + "\n")
    except OSError:
        pass   # the exit status still says it where no torchrun is in between


class StopRequest:
    def __init__(self, stop_file: Path, grace_s: float, poll_s: float = 1.0):
        self.stop_file = Path(stop_file)
        self.grace_s = grace_s
        self.signal_name = ""
        self.requested_at: Optional[float] = None
        self._previous = {}
        self._done = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        self._watcher = threading.Thread(target=self._watch, args=(poll_s,), daemon=True)
        self._watcher.start()

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self._arm()

    def _watch(self, poll_s: float) -> None:
        while not self._done.wait(poll_s):
            if self.stop_file.exists():
                self._arm()
                return

    def _arm(self) -> None:
        """Start the grace period at the first request. No lock: the signal handler calls this on
        the main thread, which may be inside ``local()`` already, so a lock could deadlock; a
        signal and the watcher arming at the same instant start two watchdogs with the same
        deadline, both disarmed by ``close``."""
        if self.requested_at is not None:
            return
        self.requested_at = time.monotonic()
        timer = threading.Thread(target=self._deadline, daemon=True)
        timer.start()

    def _deadline(self) -> None:
        if self._done.wait(self.grace_s):
            return
        sys.stderr.write(f"megatron-rl: the preemption grace period ({self.grace_s:g} s, "
                         "train.preempt_grace_s) ran out before a checkpoint was complete; exiting "
                         f"with {EXIT_REQUEUE} to resume from the previous checkpoint\n")
        sys.stderr.flush()
        mark_requeue(self.stop_file.parent, "grace period ran out; resume from the previous checkpoint")
        os._exit(EXIT_REQUEUE)

    def local(self) -> bool:
        if self.requested_at is None and self.stop_file.exists():
            self._arm()
        return self.requested_at is not None

    def reason(self) -> str:
        return self.signal_name or f"stop file {self.stop_file}"

    def elapsed(self) -> float:
        """Seconds since the request (0 when there was none)."""
        return 0.0 if self.requested_at is None else time.monotonic() - self.requested_at

    def close(self) -> None:
        """The stop is complete (or the run ended): disarm the watchdog, restore the handlers."""
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
