"""Known native warning lines are dropped from fd 2 while the engine starts; every other line,
native or Python, still reaches stderr, and fd 2 is restored afterwards."""

from __future__ import annotations

import subprocess
import sys

CHILD = r'''
import os, sys
from megatron_rl.rollout.native_stderr import dropping_lines
with dropping_lines(["NUMA binding"]):
    os.write(2, b"[W] Warning: NUMA binding: Using MEMBIND policy\n")
    os.write(2, b"native line kept\n")
    print("python line kept", file=sys.stderr)
    os.write(2, b"tail without newline")
os.write(2, b"\nafter: fd 2 restored\n")
'''


def test_only_the_named_lines_are_dropped_and_fd2_comes_back():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "NUMA" not in r.stderr
    assert "native line kept\n" in r.stderr and "python line kept\n" in r.stderr
    assert r.stderr.endswith("tail without newline\nafter: fd 2 restored\n")


def test_an_error_inside_still_restores_fd2():
    code = CHILD.replace('os.write(2, b"tail without newline")', 'raise SystemExit(3)')
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "native line kept" in r.stderr and "NUMA" not in r.stderr
