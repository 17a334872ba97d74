"""The code sandbox contains hostile programs, and the machine running the tests is unaffected.

Each program runs under the code reward's sandbox with small limits; each must end contained
(killed at a limit, or failing inside the box), report why, and leave nothing behind: no file
outside its directory, no process of the sandbox user, the test process alive.
"""

import os
import subprocess

import pytest

from megatron_rl.rewards import score
from megatron_rl.rewards.sandbox import ISOLATION_FAILED, SandboxLimits, run_untrusted

LIMITS = SandboxLimits(wall_s=4.0, cpu_s=2, memory_mb=256)
# the CPU-limit case gets a wall limit far above its CPU limit: on a loaded 2-core CI machine a
# busy loop may get only half a core, and must still meet the CPU limit first
CPU_BOUND = SandboxLimits(wall_s=20.0, cpu_s=1, memory_mb=256)
HOST_MARK = "/tmp/megatron_rl_sandbox_escape_marker"
ETC_MARK = "/etc/megatron_rl_sandbox_escape_marker"
PROJECT_MARK = os.path.abspath(__file__) + ".pwned"  # under /tmp in some CI clones: then hidden


def _limits(name):
    return CPU_BOUND if name == "infinite_loop" else LIMITS


def _run(code, limits=LIMITS):
    r = run_untrusted(code, limits=limits)
    if r.returncode == ISOLATION_FAILED:
        pytest.skip(f"this machine cannot create the sandbox's namespaces: {r.stderr.strip()}")
    return r


def _nobody_processes() -> int:
    out = subprocess.run(["ps", "-u", "nobody", "-o", "pid="], capture_output=True, text=True)
    return len(out.stdout.split())


HOSTILE = {
    "infinite_loop": ("while True: pass", "killed by SIGKILL"),
    "fork_bomb": ("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
                  "wall-clock limit"),
    "allocate_10gb": ("x = bytearray(10 * 1024**3)\nprint('allocated')", "MemoryError"),
    "network": ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\nprint('up')",
                "Network is unreachable"),
    "write_outside": (f"open({ETC_MARK!r}, 'w').write('x')", "Permission denied"),
    "write_project": (f"open({PROJECT_MARK!r}, 'w').write('x')\nprint('wrote')", None),
    "write_host_tmp": (f"open({HOST_MARK!r}, 'w').write('x')\nprint('wrote')", None),
    "read_secrets": ("import os\nprint(sorted(os.environ))", None),
    "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
                    "os.killpg(os.getpgid(0), signal.SIGKILL)", None),
}


@pytest.fixture(scope="module")
def hostile_results():
    os.environ["MEGATRON_RL_TEST_SECRET"] = "hunter2"
    try:
        return {name: _run(code, _limits(name)) for name, (code, _) in HOSTILE.items()}
    finally:
        del os.environ["MEGATRON_RL_TEST_SECRET"]


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_contained_and_reported(hostile_results, name):
    r = hostile_results[name]
    _, evidence = HOSTILE[name]
    if evidence == "wall-clock limit":
        assert r.timed_out and evidence in r.reason()
    elif evidence == "killed by SIGKILL":
        assert evidence in r.reason() and r.seconds < _limits(name).wall_s  # CPU limit before wall
    elif evidence is not None:
        assert not r.ok and evidence in r.stderr, (r.reason(), r.stderr[-300:])
    assert r.seconds < _limits(name).wall_s + 3


def test_nothing_escaped_to_the_host(hostile_results):
    assert not os.path.exists(ETC_MARK) and not os.path.exists(PROJECT_MARK)
    assert hostile_results["write_project"].stdout == ""
    assert not os.path.exists(HOST_MARK)                       # /tmp inside was a private tmpfs
    assert hostile_results["write_host_tmp"].stdout == "wrote\n"
    env = hostile_results["read_secrets"].stdout
    assert "MEGATRON_RL_TEST_SECRET" not in env and env.strip() == "['HOME', 'LANG', 'PATH']"
    assert _nobody_processes() == 0                            # fork bomb fully reaped
    assert os.getpid() > 0                                     # and we are still here


def test_code_reward_scores_tests_passing_and_failing():
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    tests = "assert add(2, 3) == 5"
    r = score("code", good, tests)
    if r.error and "could not isolate" in r.error:
        pytest.skip(r.error)
    assert r.score == 1.0 and r.error is None
    assert score("code", bad, tests).score == 0.0
    assert score("code", "```python\nwhile True: pass\n```", tests, wall_s=3, cpu_s=1).score == 0.0
