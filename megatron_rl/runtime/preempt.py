"""Stopping at a safe point: SIGTERM / SIGUSR1 (SLURM's warning before a kill), Ctrl-C (SIGINT;
a second one aborts at once) or a stop file.

The handler only records the request; the trainer checks it between steps (every rank agrees
through one MAX all-reduce), writes a checkpoint, and exits with ``EXIT_REQUEUE`` so that
``launch/slurm.sbatch`` requeues the job, which resumes from that checkpoint. The stop file
(``<output_dir>/STOP``) is for launchers that cannot deliver a signal to every rank: the sbatch
script's trap creates it on the shared filesystem, and a watcher thread notices it within a second.

Stops are honoured from the first second: ``record_signals_early`` (the CLI's first act) records a
signal that arrives while the package imports and the model builds, and ``StopRequest`` adopts
it; a stop file is stale (left by the run before) only if it predates this process, or names
another request: the sbatch trap writes ``request <SLURM_JOB_ID>.<SLURM_RESTART_COUNT>``.

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
EXIT_ABORTED = 130  # a second Ctrl-C: the shell's status for death by SIGINT
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


REQUEUE_FILE = "REQUEUE"
_EARLY = {"signal": "", "at": None}
_CTRL_C = {"count": 0}


def _ctrl_c(signum) -> None:
    """Ctrl-C is a stop like SIGTERM (a checkpoint at the next step, exit 75), said in one line;
    a second one aborts at once: no checkpoint, the newest complete one stays, nothing else is
    waited for (exit 130, as after a kill: the output directory's lock is stale-proof)."""
    if signum != signal.SIGINT:
        return
    _CTRL_C["count"] += 1
    if _CTRL_C["count"] == 1:
        sys.stderr.write("\nmegatron-rl: Ctrl-C: stopping after the current step, with a checkpoint "
                         "(rerun the same command to resume); Ctrl-C again aborts at once\n")
    else:
        sys.stderr.write("\nmegatron-rl: second Ctrl-C: aborting now, without a checkpoint (the "
                         "newest complete one is kept)\n")
        sys.stderr.flush()
        os._exit(EXIT_ABORTED)
    sys.stderr.flush()


def _early_handler(signum, frame) -> None:
    _ctrl_c(signum)
    if _EARLY["at"] is None:
        _EARLY.update(signal=signal.Signals(signum).name, at=time.monotonic())


def record_signals_early() -> None:
    """Record SIGTERM / SIGUSR1 from now on (main thread only), until a ``StopRequest`` takes
    over: a preemption during start-up is then a stop at the first safe point, not a kill."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _early_handler)


def own_request_id() -> Optional[str]:
    """What this job's launcher writes into a stop file: ``MEGATRON_RL_REQUEST_ID``, or under
    SLURM ``<job id>.<restart count>`` (a requeued job has a new restart count)."""
    if os.environ.get("MEGATRON_RL_REQUEST_ID"):
        return os.environ["MEGATRON_RL_REQUEST_ID"]
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else None


def process_start_ticks(pid: int) -> Optional[int]:
    """When process ``pid`` started, in clock ticks since boot (field 22 of /proc/PID/stat), or
    None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_start_time() -> float:
    """This process's start (wall clock, from /proc), or now where /proc cannot say."""
    ticks = process_start_ticks(os.getpid())
    if ticks is None:
        return time.time()
    try:
        with open("/proc/stat") as f:
            btime = next(int(ln.split()[1]) for ln in f if ln.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return time.time()


def stop_file_is_stale(path: Path, started: float, request_id: Optional[str]) -> bool:
    """A stop file written for an earlier run: it names another request, or (no request named,
    e.g. a hand-made ``touch STOP``) it was last written before this process started."""
    try:
        st = path.stat()
        first = path.read_text(errors="replace").split("\n", 1)[0].split()
    except OSError:
        return False
    if len(first) == 2 and first[0] == "request" and request_id is not None:
        return first[1] != request_id
    return st.st_mtime < started - 1.0   # the file time's granularity (1 s on some NFS servers)


def _signature(path: Path):
    try:
        st = path.stat()
        return (st.st_ino, st.st_mtime_ns)
    except OSError:
        return None


def mark_requeue(run_dir: Path, text: str) -> None:
    """Leave ``<run_dir>/REQUEUE`` for the launcher (any rank may call it; last writer wins)."""
    try:
        (Path(run_dir) / REQUEUE_FILE).write_text(text + "\n")
    except OSError:
        pass   # the exit status still says it where no torchrun is in between


class StopRequest:
    """A stop asked for by a signal (TERM, USR1, ...) or a stop file, with its grace period."""
    def __init__(self, stop_file: Path, grace_s: float, poll_s: float = 1.0,
                 started: Optional[float] = None, request_id: Optional[str] = None):
        self.stop_file = Path(stop_file)
        self.grace_s = grace_s
        self.signal_name = ""
        self.requested_at: Optional[float] = None
        self._previous = {}
        self._done = threading.Event()
        started = process_start_time() if started is None else started
        # the stale file is told apart by its identity, so that every rank ignores the same one
        # (rank 0 deletes it, maybe after another rank looked)
        self._stale = (_signature(self.stop_file)
                       if stop_file_is_stale(self.stop_file, started, request_id) else None)
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        if _EARLY["at"] is not None:   # a signal during start-up, before this object existed
            self.signal_name = _EARLY["signal"]
            self._arm(at=_EARLY["at"])
        self._watcher = threading.Thread(target=self._watch, args=(poll_s,), daemon=True)
        self._watcher.start()

    def _handle(self, signum, frame) -> None:
        _ctrl_c(signum)
        if self.requested_at is None:
            self.signal_name = signal.Signals(signum).name
        self._arm()

    def _file_request(self) -> bool:
        sig = _signature(self.stop_file)
        return sig is not None and sig != self._stale

    def discard_stale(self) -> None:
        """Delete the stale stop file (one rank: rank 0)."""
        if self._stale is not None and _signature(self.stop_file) == self._stale:
            self.stop_file.unlink(missing_ok=True)

    def _watch(self, poll_s: float) -> None:
        while not self._done.wait(poll_s):
            if self._file_request():
                self._arm()
                return

    def _arm(self, at: Optional[float] = None) -> None:
        """Start the grace period at the first request. No lock: the signal handler calls this on
        the main thread, which may be inside ``local()`` already, so a lock could deadlock; a
        signal and the watcher arming at the same instant start two watchdogs with the same
        deadline, both disarmed by ``close``."""
        if self.requested_at is not None:
            return
        self.requested_at = time.monotonic() if at is None else at
        timer = threading.Thread(target=self._deadline, daemon=True)
        timer.start()

    def _deadline(self) -> None:
        if self._done.wait(max(0.0, self.grace_s - self.elapsed())):
            return
        sys.stderr.write(f"megatron-rl: the preemption grace period ({self.grace_s:g} s, "
                         "train.preempt_grace_s) ran out before a checkpoint was complete; exiting "
                         f"with {EXIT_REQUEUE} to resume from the previous checkpoint\n")
        sys.stderr.flush()
        mark_requeue(self.stop_file.parent, "grace period ran out; resume from the previous checkpoint")
        os._exit(EXIT_REQUEUE)

    def local(self) -> bool:
        """Whether a stop was requested on this rank (signals, or the stop file now)."""
        if self.requested_at is None and self._file_request():
            self._arm()
        return self.requested_at is not None

    def reason(self) -> str:
        """The signal's name or the stop file, for the log line."""
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
