"""Stopping at a safe point: SIGTERM / SIGUSR1 (SLURM's warning before a kill) or a stop file.

The handler only sets a flag; the trainer checks it between steps (every rank agrees through one
MAX all-reduce), writes a checkpoint, and exits with ``EXIT_REQUEUE`` so that
``launch/slurm.sbatch`` requeues the job, which resumes from that checkpoint. The stop file
(``<output_dir>/STOP``) is for launchers that cannot deliver a signal to every rank: the sbatch
script's trap creates it on the shared filesystem.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

EXIT_REQUEUE = 75   # EX_TEMPFAIL: "stopped on request, try again"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, stop_file: Path):
        self.stop_file = Path(stop_file)
        self.signal_name = ""
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def local(self) -> bool:
        return bool(self.signal_name) or self.stop_file.exists()

    def reason(self) -> str:
        return self.signal_name or f"stop file {self.stop_file}"

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
