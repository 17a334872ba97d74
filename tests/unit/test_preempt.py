"""The stop request: a signal or the stop file starts the grace period; a checkpoint completed in
time disarms it; otherwise the process leaves with the requeue status before the kill comes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from megatron_rl.runtime.preempt import EXIT_REQUEUE, StopRequest


def _child(body: str, tmp_path) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import os, signal, time
        from pathlib import Path
        from megatron_rl.runtime.preempt import StopRequest
        stop_file = Path({str(tmp_path / 'STOP')!r})
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_a_signal_with_no_safe_point_in_the_grace_period_exits_for_requeue(tmp_path):
    t0 = time.monotonic()
    r = _child("""
        stop = StopRequest(stop_file, grace_s=0.3)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(30)          # a step that never ends
        print("not reached")
    """, tmp_path)
    assert r.returncode == EXIT_REQUEUE and "not reached" not in r.stdout
    assert "grace period (0.3 s, train.preempt_grace_s) ran out" in r.stderr
    assert "grace period ran out" in (tmp_path / "REQUEUE").read_text()   # torchrun hides the 75
    assert time.monotonic() - t0 < 20


def test_a_stop_completed_within_the_grace_period_disarms_the_watchdog(tmp_path):
    r = _child("""
        stop = StopRequest(stop_file, grace_s=0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.local() and stop.reason() == "SIGTERM"
        stop.close()            # checkpoint written, stopping cleanly
        time.sleep(1.0)
        print("clean", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["clean", "True"]


def test_the_stop_file_is_noticed_between_safe_points(tmp_path):
    stop = StopRequest(tmp_path / "STOP", grace_s=60, poll_s=0.02)
    try:
        assert not stop.local() and stop.elapsed() == 0.0
        (tmp_path / "STOP").write_text("")
        deadline = time.monotonic() + 5
        while stop.requested_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.requested_at is not None   # the watcher saw it, not a check at a step end
        assert stop.local() and stop.reason() == f"stop file {tmp_path / 'STOP'}"
    finally:
        stop.close()


@pytest.mark.parametrize("grace", ["0", "-5", "soon"])
def test_a_grace_period_that_is_not_positive_is_a_config_error(grace):
    from megatron_rl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.preempt_grace_s"):
        load_config("configs/recipes/tiny_moe_gspo.yaml", [f"train.preempt_grace_s={grace}"])


@pytest.mark.parametrize("content,age_s,request_id,stale", [
    ("", 3600, None, True),                          # a hand-made STOP left by the last run
    ("", -2, None, False),                           # touched after this process started
    ("request 77.0\n", 3600, "77.1", True),          # the requeued job's predecessor asked
    ("request 77.1\n", 3600, "77.1", False),         # this incarnation asked (any file time)
    ("request 77.1\n", -2, None, False),             # no id of our own: the file time decides
])
def test_a_stop_file_is_stale_only_if_it_belongs_to_an_earlier_run(tmp_path, content, age_s,
                                                                    request_id, stale):
    import os

    from megatron_rl.runtime.preempt import process_start_time

    f = tmp_path / "STOP"
    f.write_text(content)
    t = process_start_time() - age_s
    os.utime(f, (t, t))
    stop = StopRequest(f, grace_s=60, poll_s=0.02, request_id=request_id)
    try:
        time.sleep(0.1)   # the watcher has looked
        assert stop.local() is (not stale)
        stop.discard_stale()
        assert f.exists() is (not stale)
    finally:
        stop.close()


def test_the_slurm_request_id_names_the_job_incarnation(monkeypatch):
    from megatron_rl.runtime.preempt import own_request_id

    monkeypatch.delenv("MEGATRON_RL_REQUEST_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert own_request_id() == "4242.3"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert own_request_id() is None


def test_a_signal_before_the_stop_request_exists_is_adopted_with_its_time(tmp_path):
    r = _child("""
        from megatron_rl.runtime.preempt import record_signals_early
        record_signals_early()
        os.kill(os.getpid(), signal.SIGTERM)   # while the model would still be building
        time.sleep(0.3)
        stop = StopRequest(stop_file, grace_s=60)
        print(stop.local(), stop.reason(), stop.elapsed() >= 0.3)
        stop.close()
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "SIGTERM", "True"]


def test_ctrl_c_is_a_stop_in_one_line_and_a_second_one_aborts_at_once(tmp_path):
    r = _child("""
        stop = StopRequest(stop_file, grace_s=60)
        os.kill(os.getpid(), signal.SIGINT)      # no KeyboardInterrupt: a stop request
        time.sleep(0.2)
        print(stop.local(), stop.reason(), flush=True)
        os.kill(os.getpid(), signal.SIGINT)      # the second: out at once
        time.sleep(5)
        print("still running", flush=True)
    """, tmp_path)
    assert r.returncode == 130, r.stderr
    assert r.stdout.split() == ["True", "SIGINT"]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 2 and "Traceback" not in r.stderr, r.stderr
    assert "Ctrl-C: stopping after the current step, with a checkpoint" in lines[0]
    assert "second Ctrl-C: aborting now" in lines[1]


def test_ctrl_c_after_another_stop_request_keeps_that_reason(tmp_path):
    r = _child("""
        stop = StopRequest(stop_file, grace_s=60)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        print(stop.reason(), flush=True)
        stop.close()
    """, tmp_path)
    assert r.returncode == 0 and r.stdout.split() == ["SIGTERM"], r.stderr
