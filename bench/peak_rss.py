"""Resident-memory readings of this process for the benchmarks (Linux ``/proc``): the current
resident set, its high-water mark, and a reset of that mark so that one piece of work is
measured alone."""

from __future__ import annotations


def rss_kb(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (high-water mark since the last reset) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_high_water() -> int:
    """Reset ``VmHWM`` to the current resident set (``/proc/self/clear_refs``); returns it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_kb("VmRSS")
