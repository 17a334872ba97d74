"""One run per output directory: a live holder refuses the next, a dead one's lock is taken over,
a fresh lock is never stolen, and the decision about another host needs no clock agreement."""

import json
import multiprocessing as mp
import os
import socket
import time

import pytest

from megatron_rl.runtime.preempt import process_start_ticks
from megatron_rl.runtime.run_lock import HOLDER, LOCK_DIR, RunDirBusy, RunLock


def test_a_live_holder_refuses_a_second_run_naming_itself(tmp_path):
    first = RunLock(tmp_path, "run-a")
    first.acquire()
    try:
        with pytest.raises(RunDirBusy) as e:
            RunLock(tmp_path, "run-b").acquire()
        msg = str(e.value)
        assert "run run-a" in msg and f"pid {os.getpid()}" in msg and "\n" not in msg
    finally:
        first.release()
    assert not (tmp_path / LOCK_DIR).exists()
    second = RunLock(tmp_path, "run-b")
    second.acquire()   # free again after release
    second.release()


def _hold_and_die(path):
    RunLock(path, "dead-run").acquire()
    os._exit(0)   # like kill -9: no release


def test_the_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    p = mp.get_context("fork").Process(target=_hold_and_die, args=(str(tmp_path),))
    p.start()
    p.join()
    assert json.loads((tmp_path / LOCK_DIR / HOLDER).read_text())["run_id"] == "dead-run"
    t0 = time.monotonic()
    lock = RunLock(tmp_path, "next-run", stale_s=60)
    lock.acquire()
    assert time.monotonic() - t0 < 5   # no waiting for a heartbeat: the pid is gone
    assert json.loads((tmp_path / LOCK_DIR / HOLDER).read_text())["run_id"] == "next-run"
    lock.release()


def test_a_reused_pid_does_not_keep_a_dead_lock(tmp_path):
    """The holder's pid now belongs to another process (ours): the start times differ."""
    (tmp_path / LOCK_DIR).mkdir()
    (tmp_path / LOCK_DIR / HOLDER).write_text(json.dumps(
        {"run_id": "old", "host": socket.gethostname(), "pid": os.getpid(), "pid_start": 1,
         "beat": 0}))
    assert process_start_ticks(os.getpid()) != 1
    lock = RunLock(tmp_path, "new", stale_s=60)
    lock.acquire()
    lock.release()


def _fake_remote(tmp_path, beat=0):
    (tmp_path / LOCK_DIR).mkdir(exist_ok=True)
    (tmp_path / LOCK_DIR / HOLDER).write_text(json.dumps(
        {"run_id": "remote", "host": "another-node", "pid": 1, "pid_start": 1, "beat": beat}))


def test_another_hosts_lock_is_stale_only_when_its_heartbeat_stops(tmp_path):
    _fake_remote(tmp_path)
    t0 = time.monotonic()
    lock = RunLock(tmp_path, "mine", stale_s=0.6, heartbeat_s=0.2)
    lock.acquire()   # no beat for 0.6 s of our own watching
    assert time.monotonic() - t0 >= 0.6
    lock.release()


def test_another_hosts_lock_with_a_moving_heartbeat_is_live(tmp_path):
    import threading

    _fake_remote(tmp_path)
    stop = threading.Event()

    def beat():
        n = 0
        while not stop.wait(0.05):
            n += 1
            _fake_remote(tmp_path, n)

    t = threading.Thread(target=beat)
    t.start()
    try:
        with pytest.raises(RunDirBusy, match="run remote .*on another-node"):
            RunLock(tmp_path, "mine", stale_s=0.6, heartbeat_s=0.2).acquire()
    finally:
        stop.set()
        t.join()


def test_the_holder_beats_while_it_runs(tmp_path):
    lock = RunLock(tmp_path, "beating", heartbeat_s=0.05)
    lock.acquire()
    try:
        time.sleep(0.5)
        assert json.loads((tmp_path / LOCK_DIR / HOLDER).read_text())["beat"] >= 3
    finally:
        lock.release()


def test_a_takeover_never_steals_a_lock_renewed_meanwhile(tmp_path):
    """Judged stale, but by the time of the rename a new holder is in place: it is put back."""
    _fake_remote(tmp_path)
    lock = RunLock(tmp_path, "mine")
    judged = json.loads((tmp_path / LOCK_DIR / HOLDER).read_text())
    _fake_remote(tmp_path, beat=7)    # a new holder wrote since
    lock._take_over(judged)
    assert json.loads((tmp_path / LOCK_DIR / HOLDER).read_text())["beat"] == 7
