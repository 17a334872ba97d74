"""Named kill points, for proving crash safety (``tests/e2e/test_crash_resume.py``).

With ``MEGATRON_RL_KILL_AT=<point>:<step>[:<delay_ms>]`` in the environment, the process kills
itself with SIGKILL (no handler, no cleanup, like a node failure or the OOM killer) when it reaches
``<point>`` during step ``<step>``, or ``delay_ms`` milliseconds after it, wherever the process is
by then: a point marks the start of a phase and the delay moves the kill to a random moment inside
it (or beyond). Without the variable ``reached`` returns at once; it costs nothing in a real run.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional, Tuple

ENV = "MEGATRON_RL_KILL_AT"
POINTS = (
    "rollout",             # the step starts: prompts, generation, rewards
    "train",               # log-prob passes and the optimizer updates
    "train.epoch",         # a second or later pass over the step's batch (train.epochs_per_step)
    "sync",                # weights pushed into the engine
    "push",                # separate placement: a version streamed to the engine ranks
    "generate",            # separate placement, on an engine rank: a step's generation starts
    "checkpoint",          # the temporary checkpoint directory is being written
    "checkpoint.written",  # every file written, not yet renamed into place
    "checkpoint.renamed",  # step_N in place, ``latest`` still names the previous one
    "checkpoint.latest",   # ``latest`` updated, old checkpoints not yet pruned
)


def _parse(spec: str) -> Optional[Tuple[str, int, float]]:
    if not spec:
        return None
    parts = spec.split(":")
    try:
        point, step = parts[0], int(parts[1])
        delay = float(parts[2]) / 1000 if len(parts) > 2 else 0.0
    except (IndexError, ValueError):
        raise ValueError(f"{ENV}={spec!r}: expected <point>:<step>[:<delay_ms>]") from None
    if point not in POINTS or len(parts) > 3:
        raise ValueError(f"{ENV}={spec!r}: the point must be one of {', '.join(POINTS)}")
    return point, step, delay


_SPEC = _parse(os.environ.get(ENV, ""))


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def reached(point: str, step: int) -> None:
    """Called by the trainer at each point; kills the process when the environment asks for it."""
    if _SPEC is None or _SPEC[0] != point or _SPEC[1] != step:
        return
    if _SPEC[2] <= 0:
        _kill()
    timer = threading.Timer(_SPEC[2], _kill)
    timer.daemon = True
    timer.start()
