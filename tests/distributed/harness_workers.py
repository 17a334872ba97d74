"""Workers for the harness's own tests: one that blocks without using the CPU, one that works."""

import time


def blocked(rank: int, world: int, seconds: float):
    """Sleeps: a process waiting on something that never comes, using no CPU."""
    time.sleep(seconds)
    return {"rank": rank}


def busy(rank: int, world: int, seconds: float):
    """Computes for ``seconds``: slow, but making progress."""
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += sum(range(1000))
    return {"rank": rank, "n": n > 0}
