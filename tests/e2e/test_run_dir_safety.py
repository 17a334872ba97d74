"""The output directory through the CLI: one run at a time, stops honoured from the first second,
a full disk said in one line with the last checkpoint intact.

Each test reproduces a fault found by hand: two trainers in one directory mixed a checkpoint; a
STOP file or SIGTERM during start-up was lost (the run trained to the end, or died with -15 and
no requeue); a full disk ended in a 57-line traceback without "No space left"."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.test_train_cli import ROOT, _args

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _popen(out: Path, steps: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(_args(out, steps, *extra), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    try:
        return proc.communicate(timeout=timeout)[1]
    finally:
        proc.kill()


def _wait_for_lock_holder(out: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    from megatron_rl.runtime.run_lock import HOLDER, LOCK_DIR

    deadline = time.monotonic() + timeout
    while not (out / LOCK_DIR / HOLDER).is_file():
        assert proc.poll() is None, _finish(proc)[-2000:]
        assert time.monotonic() < deadline, "the first trainer never took the lock"
        time.sleep(0.05)


def test_a_second_trainer_in_the_same_directory_is_refused_and_the_first_is_untouched(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # the previous run's stop request and its answer: stale, so this run trains and clears them
    (out / "STOP").write_text("")
    os.utime(out / "STOP", (time.time() - 3600,) * 2)
    (out / "REQUEUE").write_text("old\n")
    first = _popen(out, 3, "train.export_hf=false")
    _wait_for_lock_holder(out, first)   # not a fixed sleep: on a loaded machine the second could win
    second = _popen(out, 3, "train.export_hf=false")
    err2 = _finish(second)
    err1 = _finish(first)
    assert first.returncode == 0, err1[-2000:]
    lines = [ln for ln in err2.splitlines() if ln.strip()]
    assert second.returncode == 2 and len(lines) == 1, err2[-2000:]
    assert lines[0].startswith(f"megatron-rl: error: {out}: in use by run ")
    assert f"pid {first.pid} on " in lines[0] and "choose another train.output_dir" in lines[0]
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000002", "step_00000003"]
    state = json.loads((out / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    manifest = json.loads((out / "checkpoints" / "step_00000003" / "manifest.json").read_text())
    assert state["run_id"] and state["run_id"] == manifest["run_id"]
    assert not (out / ".lock").exists() and not (out / "STOP").exists()
    assert not (out / "REQUEUE").exists()
    # and a new run that would start over on top of those checkpoints is refused, not let prune
    again = subprocess.run(_args(out, 3, "train.resume=false"), cwd=ROOT, capture_output=True,
                           text=True, timeout=600, env=ENV)
    assert again.returncode == 2 and "train.resume: false, but" in again.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ckpts
    # a rerun of the finished run with another learning rate: refused, naming the change (it
    # used to "resume", train one step with the new lr and rewrite config.yaml as if all were)
    config = (out / "config.yaml").read_text()
    drift = subprocess.run(_args(out, 4, "train.lr=5e-3"), cwd=ROOT, capture_output=True,
                           text=True, timeout=600, env=ENV)
    errors = [ln for ln in drift.stderr.splitlines() if ln.startswith("megatron-rl:")]
    assert drift.returncode == 2 and len(errors) == 1, drift.stderr[-2000:]
    assert "was trained with other settings: train.lr: 0.001 -> 0.005" in errors[0]
    assert "train.resume=force" in errors[0]
    assert (out / "config.yaml").read_text() == config
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ckpts


def _stopped_during_startup(proc: subprocess.Popen, out: Path) -> str:
    err = _finish(proc)
    assert proc.returncode == 75, err[-3000:]
    assert "stop requested during start-up" in err
    assert (out / "REQUEUE").is_file()
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert not (out / ".lock").exists()
    return err


def test_a_stop_file_written_during_startup_is_honoured(tmp_path):
    out = tmp_path / "run"
    proc = _popen(out, 50, "train.export_hf=false")
    time.sleep(1.0)   # the package is still importing: nothing of the run exists yet
    out.mkdir(parents=True, exist_ok=True)
    (out / "STOP").write_text("")
    err = _stopped_during_startup(proc, out)
    assert f"stop file {out / 'STOP'}" in err


def _catches(pid: int, sig: signal.Signals) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(ln.split()[1], 16) for ln in f if ln.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(mask >> (sig - 1) & 1)


def test_sigterm_during_startup_is_a_stop_with_requeue_not_a_kill(tmp_path):
    out = tmp_path / "run"
    proc = _popen(out, 50, "train.export_hf=false")
    deadline = time.time() + 60
    while not _catches(proc.pid, signal.SIGTERM):   # the CLI's first act, well before torch
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    err = _stopped_during_startup(proc, out)
    assert "SIGTERM" in err


def _can_mount_tmpfs() -> str:
    if os.geteuid() != 0:
        return "mounting a small tmpfs needs root (CI runs as root)"
    if shutil.which("unshare") is None:
        return "no unshare(1) here"
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True, text=True)
    return "" if r.returncode == 0 else f"cannot mount a tmpfs here: {r.stderr.strip()[:200]}"


def _run_on_a_small_disk(out: Path, steps: int, mount: Path, size: str, after: str) -> str:
    """The run with a tmpfs of ``size`` mounted at ``mount`` (a private mount namespace), then the
    shell command ``after`` inside it; asserts exit 74 with no traceback, returns the last line."""
    cmd = " ".join(f"'{a}'" for a in _args(out, steps, "train.export_hf=false"))
    script = (f"mount -t tmpfs -o size={size} tmpfs '{mount}' && cd '{ROOT}' && "
              f"{{ {cmd}; rc=$?; }}; {after}; exit $rc")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 74, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return [ln for ln in r.stderr.splitlines() if ln.strip()][-1]


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_last_checkpoint_stays(tmp_path):
    why = _can_mount_tmpfs()
    if why:
        pytest.skip(why)
    from megatron_rl.checkpoint import manifest as M

    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    ckpt.mkdir(parents=True)
    # 4 MiB: the step 2 checkpoint (2.7 MiB) fits, step 4's does not
    last = _run_on_a_small_disk(out, 6, ckpt, "4m", f"cp -a '{ckpt}/.' '{out}/after'")
    assert last.startswith("megatron-rl: writing checkpoint to ") and str(ckpt) in last
    assert "No space left on device (ENOSPC)" in last and "step_00000002" in last
    after = out / "after"
    assert sorted(p.name for p in after.iterdir()) == ["latest", "step_00000002"]
    step2 = after / "step_00000002"
    expected = M.read_manifest(step2)
    assert M.check_files(step2, expected, sorted(expected)) == []
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_full_disk_at_start_up_is_one_line_and_leaves_no_partial_weights(tmp_path):
    """The first large write of a fresh run is the engine's initial HF weights: on a 512 KiB disk
    it fails as a checkpoint's does (one line, exit 74), and neither ``hf_init`` nor its partial
    directory is left behind."""
    why = _can_mount_tmpfs()
    if why:
        pytest.skip(why)
    out = tmp_path / "run"
    out.mkdir()
    last = _run_on_a_small_disk(out, 2, out, "512k", f"ls -A '{out}' > '{tmp_path}/left'")
    assert last.startswith("megatron-rl: writing the engine's initial weights to ") and "hf_init" in last
    assert "No space left on device (ENOSPC)" in last and "no partial files are left" in last
    left = (tmp_path / "left").read_text().split()
    assert "hf_init" not in left and ".hf_init.partial" not in left, left
