"""The code sandbox contains hostile programs, and the machine running the tests is unaffected.

Each of the 31 programs (network, filesystem, privileges, secrets, signals, resources, IPC) runs under
the code reward's sandbox with small limits; each must end contained
(killed at a limit, or failing inside the box), report why, and leave nothing behind: no file
outside its directory, no process of the sandbox user, the test process alive.
"""

import glob
import os
import socket
import threading
import time

import pytest

from megatron_rl.rewards import score
from megatron_rl.rewards.sandbox import ISOLATION_FAILED, SandboxLimits, run_untrusted

LIMITS = SandboxLimits(wall_s=4.0, cpu_s=2, memory_mb=256)
# the CPU-limit case gets a wall limit far above its CPU limit: on a loaded 2-core CI machine a
# busy loop may get only half a core, and must still meet the CPU limit first
CPU_BOUND = SandboxLimits(wall_s=20.0, cpu_s=1, memory_mb=256)
# the flood must end at the wall-clock limit, whatever CPU a fast pipe lets it burn before
FLOOD = SandboxLimits(wall_s=4.0, cpu_s=30, memory_mb=256)
HOST_MARK = "/tmp/megatron_rl_sandbox_escape_marker"
ETC_MARK = "/etc/megatron_rl_sandbox_escape_marker"
PROJECT_MARK = os.path.abspath(__file__) + ".pwned"  # under /tmp in some CI clones: then hidden
PERSIST_MARKS = ("/var/tmp/megatron_rl_sandbox_persist", "/run/lock/megatron_rl_sandbox_persist",
                 "/dev/shm/megatron_rl_sandbox_persist")
SHM_KEY = 0x4D524C31
# host unix sockets (mode 777) in the usual places: the sandbox must not reach them
HOST_SOCKETS = ("/tmp/megatron_rl_sandbox_test.sock", "/run/megatron_rl_sandbox_test.sock")


def _limits(name):
    return {"infinite_loop": CPU_BOUND, "output_flood": FLOOD}.get(name, LIMITS)


def _run(code, limits=LIMITS):
    r = run_untrusted(code, limits=limits)
    if r.returncode == ISOLATION_FAILED:
        pytest.skip(f"this machine cannot create the sandbox's namespaces: {r.stderr.strip()}")
    return r


HOSTILE = {
    "infinite_loop": ("while True: pass", "killed by SIGKILL"),
    "fork_bomb": ("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
                  "wall-clock limit"),
    "allocate_10gb": ("x = bytearray(10 * 1024**3)\nprint('allocated')", "MemoryError"),
    "network": ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\nprint('up')",
                "Network is unreachable"),
    "write_outside": (f"open({ETC_MARK!r}, 'w').write('x')", "Read-only file system"),
    "write_project": (f"open({PROJECT_MARK!r}, 'w').write('x')\nprint('wrote')", None),
    "write_host_tmp": (f"open({HOST_MARK!r}, 'w').write('x')\nprint('wrote')", None),
    "read_secrets": ("import os\nprint(sorted(os.environ))", None),
    "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
                    "os.killpg(os.getpgid(0), signal.SIGKILL)", None),
    # network, other ways out
    "dns_lookup": ("import socket\nprint(socket.getaddrinfo('pypi.org', 443))", "gaierror"),
    "loopback_server": ("import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\n"
                        "socket.create_connection(s.getsockname(), timeout=2)\nprint('up')", "Network is unreachable"),
    "nested_namespace_network": (
        "import ctypes, socket\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print('unshare', libc.unshare(0x10000000 | 0x40000000))\n"
        "socket.create_connection(('1.1.1.1', 80), timeout=2)\nprint('up')", "Network is unreachable"),
    # filesystem and privileges
    "read_shadow": ("print(open('/etc/shadow').read())", "Permission denied"),
    "list_root_home": ("import os\ntry: print(os.listdir('/root'))\nexcept OSError as e: print(e)", None),
    "symlink_out": (f"import os\nos.symlink({PROJECT_MARK!r}, 'link')\nopen('link', 'w').write('x')\n"
                    "print('wrote')", None),   # denied, or hidden under /tmp: see below
    "write_interpreter": ("import os, sys\nopen(os.path.join(sys.prefix, 'lib', 'pwned.py'), 'w')",
                          "Read-only file system"),
    "setuid_root": ("import os\nos.setuid(0)\nprint('root')", "Operation not permitted"),
    "reboot": ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "print(libc.reboot(0x4321fedc), ctypes.get_errno())", None),
    # secrets: the environment of every process it can see
    "read_all_environs": ("import glob\nfor p in glob.glob('/proc/*/environ'):\n"
                          "    try: print(p, open(p).read())\n    except OSError as e: print(e)", None),
    # signals and processes
    "kill_everything": ("import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('still here')", None),
    "daemon_escape": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                      "        time.sleep(600)\n    os._exit(0)\nprint('parent done')", None),
    # resources
    "sleep_forever": ("import time\ntime.sleep(600)", "wall-clock limit"),
    "thread_bomb": ("import threading, time\nwhile True:\n"
                    "    threading.Thread(target=time.sleep, args=(60,)).start()", "can't start new thread"),
    "disk_fill": ("f = open('big', 'wb')\nwhile True: f.write(b'x' * 2**20)", "File too large"),
    "tmp_fill": ("f = open('/tmp/big', 'wb')\nwhile True: f.write(b'x' * 2**20)",
                 "No space left on device"),
    "output_flood": ("import os\nwhile True: os.write(1, b'x' * 65536)", None),
    # found outside the first set: each escaped the earlier sandbox
    "setsid_survivor": ("import os, time\nos.setsid()\nheld = bytearray(64 * 2**20)\n"
                        "print('detached', flush=True)\ntime.sleep(600)", "wall-clock limit"),
    "persist_outside_tmp": ("".join(f"open({m!r}, 'w').write('x')\n" for m in PERSIST_MARKS)
                            + "print('wrote')", None),
    "sysv_shared_memory": ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                           f"print(libc.shmget({SHM_KEY}, 4096, 0o1666) >= 0)", None),
    "host_unix_socket": ("import socket\nfor p in " + repr(HOST_SOCKETS) + ":\n"
                         "    s = socket.socket(socket.AF_UNIX)\n"
                         "    try: s.connect(p); print('reached', p)\n"
                         "    except OSError as e: print(type(e).__name__)", None),
    "other_sandboxes": ("import glob\nprint(glob.glob('/tmp/mrl-sandbox-*') + "
                        "glob.glob('/var/tmp/mrl-sandbox-*') + glob.glob('/*/mrl-sandbox-*'))", None),
}


def _clock_ticks_now() -> int:
    """Now, in the unit of /proc/PID/stat's start time (clock ticks since boot)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK")) + 1


def _live_in_namespace(ns: str, started_by: int):
    """Live processes in PID namespace ``ns`` that started by ``started_by`` (ticks). Another
    sandbox may reuse a dead namespace's id later; its processes start after, and do not count."""
    out = []
    for p in glob.glob("/proc/[0-9]*"):
        try:
            if os.readlink(p + "/ns/pid") != ns:
                continue
            with open(p + "/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[19]) <= started_by:
            out.append(p)
    return out


def _host_sockets():
    servers = []
    for path in HOST_SOCKETS:
        try:
            srv = socket.socket(socket.AF_UNIX)
            if os.path.exists(path):
                os.unlink(path)
            srv.bind(path)
            os.chmod(path, 0o777)
            srv.listen()
            servers.append((path, srv))
        except OSError:
            pass   # e.g. /run not writable here: that place is then not tried
    return servers


@pytest.fixture(scope="module")
def hostile_results():
    os.environ["MEGATRON_RL_TEST_SECRET"] = "hunter2"
    servers = _host_sockets()
    try:
        out = {}
        for name, (code, _) in HOSTILE.items():
            out[name] = _run(code, _limits(name))
            out[name].ended = _clock_ticks_now()
        out["_sockets"] = [p for p, _ in servers]
        return out
    finally:
        del os.environ["MEGATRON_RL_TEST_SECRET"]
        for path, srv in servers:
            srv.close()
            os.unlink(path)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_contained_and_reported(hostile_results, name):
    """Ended as expected, and no process it started outlives it (``setsid`` or not)."""
    r = hostile_results[name]
    _, evidence = HOSTILE[name]
    if evidence == "wall-clock limit":
        assert r.timed_out and evidence in r.reason()
    elif evidence == "killed by SIGKILL":
        assert evidence in r.reason() and r.seconds < _limits(name).wall_s  # CPU limit before wall
    elif evidence is not None:
        assert not r.ok and evidence in r.stderr, (r.reason(), r.stderr[-300:])
    assert r.seconds < _limits(name).wall_s + 3
    assert r.pid_namespace.startswith("pid:[")
    left = _live_in_namespace(r.pid_namespace, r.ended)
    for _ in range(50):   # a killed namespace's processes die asynchronously
        if not left:
            break
        time.sleep(0.1)
        left = _live_in_namespace(r.pid_namespace, r.ended)
    assert not left, left


def test_nothing_escaped_to_the_host(hostile_results):
    assert not os.path.exists(ETC_MARK) and not os.path.exists(PROJECT_MARK)
    assert hostile_results["write_project"].stdout == ""
    link = hostile_results["symlink_out"]   # a CI clone under /tmp is hidden by the private tmpfs
    assert link.stdout == "" and ("Permission denied" in link.stderr or "No such file" in link.stderr)
    assert not os.path.exists(HOST_MARK)                       # /tmp inside was a private tmpfs
    assert hostile_results["write_host_tmp"].stdout == "wrote\n"
    env = hostile_results["read_secrets"].stdout
    assert "MEGATRON_RL_TEST_SECRET" not in env
    assert env.strip() == "['HOME', 'LANG', 'PATH']"
    home = hostile_results["list_root_home"].stdout   # at most the interpreter's install path
    assert not [e for e in os.listdir("/root") if e != ".pyenv" and repr(e) in home] if (
        os.access("/root", os.R_OK)) else True
    for mark in PERSIST_MARKS:       # /var/tmp, /run/lock, /dev/shm inside were private tmpfs
        assert not os.path.exists(mark), mark
    assert hostile_results["persist_outside_tmp"].stdout == "wrote\n"
    assert hostile_results["sysv_shared_memory"].stdout == "True\n"   # made, in its own IPC ns
    with open("/proc/sysvipc/shm") as f:
        assert str(SHM_KEY) not in [ln.split()[0] for ln in f.readlines()[1:]]
    sockets = hostile_results["host_unix_socket"].stdout
    assert hostile_results["_sockets"] and "reached" not in sockets
    assert sockets.split() == ["FileNotFoundError"] * len(HOST_SOCKETS)
    assert hostile_results["other_sandboxes"].stdout == "[]\n"
    assert os.getpid() > 0                                     # and we are still here
    assert hostile_results["daemon_escape"].stdout == "parent done\n"
    assert hostile_results["reboot"].stdout == "-1 1\n"        # EPERM
    assert hostile_results["nested_namespace_network"].stdout == "unshare 0\n"  # own netns: empty
    environs = hostile_results["read_all_environs"].stdout
    assert "/proc/self/environ" in environs and "MEGATRON_RL" not in environs
    for name, r in hostile_results.items():
        if not name.startswith("_"):
            assert "hunter2" not in r.stdout + r.stderr, name


def test_two_sandboxes_at_once_cannot_see_or_touch_each_other():
    """``reward.workers > 1``: A keeps its program and a file alive while B looks for them (by
    every path it could guess) and tries to write there."""
    box_a = {}
    looker = ("import glob, os\nfound = [p for pat in ('/tmp/mrl-sandbox-*', '/var/tmp/mrl-sandbox-*',"
              " '/*/mrl-sandbox-*', '/proc/*/cwd/secret.txt', '/proc/*/root/work/secret.txt')"
              " for p in glob.glob(pat)]\nprint(found)\nfor p in glob.glob('/proc/[0-9]*/cwd'):\n"
              "    try: open(p + '/pwned', 'w').write('B')\n    except OSError: pass\n")
    holder = ("import os, time\nopen('secret.txt', 'w').write('A')\nprint(os.getpid(), flush=True)\n"
              "time.sleep(3)\nprint(sorted(os.listdir('.')))")
    t = threading.Thread(target=lambda: box_a.update(r=_run(holder, SandboxLimits(wall_s=8, cpu_s=2))))
    t.start()
    time.sleep(1.0)
    b = _run(looker, SandboxLimits(wall_s=8, cpu_s=2))
    t.join()
    assert b.ok and b.stdout == "[]\n", b.stdout
    a = box_a["r"]
    assert a.ok and a.stdout.split("\n")[1] == "['main.py', 'secret.txt', 'stdin.txt']", a.stdout
    assert a.pid_namespace != b.pid_namespace


def test_an_output_flood_is_cut_and_never_held_by_the_parent(hostile_results):
    """The reader keeps the first ``output_bytes`` and drops the rest while the program writes
    (at pipe speed, gigabytes in the 4 s it has); the parent's peak memory barely moves."""
    import resource

    r = hostile_results["output_flood"]
    assert r.timed_out and r.stdout == "x" * LIMITS.output_bytes
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    again = _run(HOSTILE["output_flood"][0], FLOOD)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(again.stdout) == LIMITS.output_bytes and grown_mb < 64, grown_mb


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
