"""The launch scripts: valid bash, shellcheck-clean where shellcheck is installed, and dry runs
that print the exact torchrun / srun command lines for 1 and 4 nodes."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = [ROOT / "launch" / "torchrun.sh", ROOT / "launch" / "slurm.sbatch"]
RECIPE = "configs/recipes/tiny_moe_gspo.yaml"


def _dry(script: str, args, **env) -> list:
    full = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, **env}
    out = subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=ROOT, env=full,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_valid_bash(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_shellcheck(script):
    beside = pathlib.Path(sys.executable).parent / "shellcheck"   # the test extra's, unactivated venv
    exe = shutil.which("shellcheck") or (str(beside) if beside.exists() else None)
    if exe is None:
        pytest.skip("shellcheck is not installed (it comes with the test extra: pip install -e .[test])")
    out = subprocess.run([exe, str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_torchrun_dry_run_one_node():
    cmd = _dry("torchrun.sh", [RECIPE, "train.steps=3"], NPROC="4")
    assert cmd == ["torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=4", "-m",
                   "megatron_rl", "train", "--config", RECIPE, "train.steps=3"]


@pytest.mark.parametrize("nodes,nodelist,hosts", [(1, "gpu7", ["gpu7"]),
                                                  (4, "gpu[3-6]", ["gpu3", "gpu4", "gpu5", "gpu6"])])
def test_slurm_dry_run_rendezvous_on_the_first_node(nodes, nodelist, hosts):
    cmd = _dry("slurm.sbatch", ["train.lr=2e-6"], RECIPE=RECIPE, SLURM_JOB_NODELIST=nodelist,
               SLURM_NNODES=str(nodes), SLURM_JOB_ID="4242", GPUS_PER_NODE="8")
    assert cmd[:5] == ["srun", "--kill-on-bad-exit=1", f"--nodes={nodes}", "--ntasks-per-node=1",
                       "torchrun"]
    assert f"--nnodes={nodes}" in cmd and "--nproc-per-node=8" in cmd
    assert "--rdzv-backend=c10d" in cmd and "--rdzv-id=4242" in cmd
    assert f"--rdzv-endpoint={hosts[0]}:29500" in cmd
    assert cmd[cmd.index("-m") + 1:] == ["megatron_rl", "train", "--config", RECIPE, "train.lr=2e-6"]


def test_slurm_script_requeues_on_the_stop_exit_code():
    from megatron_rl.runtime.preempt import EXIT_REQUEUE

    text = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert f"EXIT_REQUEUE={EXIT_REQUEUE}" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text


def _fake_bin(tmp_path, **scripts) -> dict:
    """A PATH whose first directory holds fake commands (bash bodies) that log their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        f = bin_dir / name
        f.write_text(f"#!/usr/bin/env bash\necho \"{name} $*\" >> {tmp_path}/calls.log\n{body}\n")
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
            "RECIPE": RECIPE}


# torchrun turns a worker's exit 75 into its own 1 (checked with torch 2.13's torchrun): the
# scripts must recognise a requested stop by the trainer's REQUEUE file instead
_STOPPED = 'mkdir -p "{out}" && echo stopped > "{out}/REQUEUE"; exit 1'


@pytest.mark.parametrize("requeue_file", [True, False])
def test_torchrun_script_turns_a_requested_stop_into_75(tmp_path, requeue_file):
    out = tmp_path / "run"
    env = _fake_bin(tmp_path, torchrun=_STOPPED.format(out=out) if requeue_file else "exit 1")
    r = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), RECIPE, f"train.output_dir={out}"],
                       cwd=ROOT, env={**env, "NPROC": "2"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == (75 if requeue_file else 1), r.stderr


def _slurm_job(tmp_path, out, srun: str):
    env = _fake_bin(tmp_path, srun=srun, scontrol='if [[ $1 == show ]]; then echo node1; fi')
    return subprocess.Popen(["bash", str(ROOT / "launch" / "slurm.sbatch"), f"train.output_dir={out}"],
                            cwd=ROOT, env={**env, "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1",
                                           "SLURM_JOB_ID": "77"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _started(tmp_path, p) -> None:
    import time

    deadline = time.time() + 60
    while "srun" not in ((tmp_path / "calls.log").read_text() if (tmp_path / "calls.log").exists() else ""):
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)


# a trainer that checkpoints when asked: waits for the STOP request, then stops as torchrun reports it
_UNTIL_STOP = 'for i in $(seq 600); do [[ -f "{out}/STOP" ]] && break; sleep 0.1; done; ' + _STOPPED


@pytest.mark.parametrize("sig,requeued", [("SIGUSR1", True), ("SIGTERM", False)])
def test_slurm_script_requeues_after_usr1_and_never_after_a_cancel(tmp_path, sig, requeued):
    """``scancel --signal=USR1 --batch`` (or the time limit's --signal): checkpoint, requeue.
    ``scancel`` (SIGTERM): checkpoint, and the job stays cancelled."""
    import signal

    out = tmp_path / "run"
    p = _slurm_job(tmp_path, out, _UNTIL_STOP.format(out=out))
    _started(tmp_path, p)
    p.send_signal(getattr(signal, sig))
    stdout, stderr = p.communicate(timeout=120)
    calls = (tmp_path / "calls.log").read_text()
    assert p.returncode == 75 and (out / "STOP").is_file(), (stdout, stderr)
    assert ("scontrol requeue 77" in calls) == requeued, calls
    assert ("not requeued" in stdout) == (not requeued)


def test_slurm_script_passes_a_failure_through_without_a_requeue(tmp_path):
    p = _slurm_job(tmp_path, tmp_path / "run", "exit 1")
    p.communicate(timeout=120)
    assert p.returncode == 1 and "scontrol requeue" not in (tmp_path / "calls.log").read_text()


def test_the_slurm_trap_writes_a_stop_request_naming_this_job_incarnation(tmp_path):
    """What the trainer compares with its own SLURM_JOB_ID.SLURM_RESTART_COUNT: a requeued job
    ignores its predecessor's request, and honours one written during its own start-up."""
    import signal
    import time

    from megatron_rl.runtime.preempt import stop_file_is_stale

    out = tmp_path / "run"
    env = _fake_bin(tmp_path, srun=f'for i in $(seq 100); do [[ -f "{out}/STOP" ]] && exit 0; sleep 0.1; done',
                    scontrol='if [[ $1 == show ]]; then echo node1; fi')
    env = {**env, "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "SLURM_JOB_ID": "77",
           "SLURM_RESTART_COUNT": "2"}
    p = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm.sbatch"), f"train.output_dir={out}"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while "srun" not in ((tmp_path / "calls.log").read_text() if (tmp_path / "calls.log").exists() else ""):
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    p.communicate(timeout=60)
    stop = out / "STOP"
    assert stop.read_text() == "request 77.2\n"
    long_after = time.time() + 3600   # the file time does not matter once a request is named
    assert not stop_file_is_stale(stop, long_after, "77.2")
    assert stop_file_is_stale(stop, long_after, "77.3")     # the requeued job
