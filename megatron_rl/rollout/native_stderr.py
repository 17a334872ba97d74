"""Dropping known native (C++) warning lines from the process's stderr for a moment.

vLLM's CPU worker binds memory to a NUMA node at start-up and torch's C++ logger announces it on
file descriptor 2 ("NUMA binding: Using MEMBIND policy ..."): Python's ``warnings`` filters never
see it, and the user can do nothing about it. ``dropping_lines`` routes fd 2 through a pipe for
the duration of the engine's construction, forwards every line but the named ones, and restores
fd 2 afterwards, whatever happens inside.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Iterator, Sequence


def _forward(read_fd: int, out_fd: int, needles: Sequence[bytes]) -> None:
    """Copy lines from ``read_fd`` to ``out_fd`` until EOF, leaving out those with a needle."""
    pending = b""
    while True:
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        kept = [ln + b"\n" for ln in lines if not any(n in ln for n in needles)]
        if kept:
            os.write(out_fd, b"".join(kept))
    if pending and not any(n in pending for n in needles):
        os.write(out_fd, pending)
    os.close(read_fd)


@contextlib.contextmanager
def dropping_lines(needles: Sequence[str]) -> Iterator[None]:
    """Inside: stderr lines (native or Python) containing any of ``needles`` are dropped."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    thread = threading.Thread(target=_forward, args=(read_fd, saved, [n.encode() for n in needles]),
                              daemon=True, name="stderr-filter")
    thread.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)   # the pipe's last writer is gone: the thread reads EOF and ends
        thread.join(timeout=2)
        if not thread.is_alive():   # else a child still holds the pipe: the thread forwards it
            os.close(saved)
