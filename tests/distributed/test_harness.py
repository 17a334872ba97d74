"""The spawn harness tells a hang from a slow run by CPU progress, not by a wall-clock budget,
so a loaded CI machine makes a multi-process check slower but never fails it."""

import time

import pytest

from tests.distributed import harness_workers
from tests.distributed.harness import spawn


def test_a_run_that_uses_no_cpu_is_killed_as_a_deadlock():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="used no CPU for 10 s"):
        spawn(harness_workers.blocked, 2, 600.0, stall_s=10)
    assert time.monotonic() - t0 < 120   # killed at the stall, not at the sleep's end


def test_a_run_that_keeps_computing_outlives_the_stall_window():
    assert spawn(harness_workers.busy, 2, 25.0, stall_s=10) == {"rank": 0, "n": True}
