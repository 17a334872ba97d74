"""Run untrusted (model-generated) Python in a contained child process.

The parent starts ``python -I -S <this file> CONFIG`` in a new session (its own process group)
with an empty environment, stdin closed and a fresh temp dir as working directory. The launcher
imports the standard library only (not this package, whose ``__init__`` pulls in torch: seconds of
start-up inside the wall-clock limit). It confines itself, then ``exec``s the interpreter on the
untrusted program:

- network: a new network namespace (only a loopback that is down) -- ``unshare(CLONE_NEWNET)``,
  as root directly, otherwise inside a new user namespace;
- filesystem: as root, a new mount namespace with fresh tmpfs over ``/tmp`` and ``/dev/shm``
  (the work dir lives elsewhere) and the user switched to ``nobody``, so nothing outside the work
  dir is writable; without root, the user namespace maps the caller to an unprivileged id;
- resources: ``RLIMIT_CPU`` (CPU seconds), ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE`` (file size),
  ``RLIMIT_NPROC`` (fork bombs: enforced for the unprivileged user), no core files;
- time: the parent kills the whole process group at the wall-clock limit.

If a namespace cannot be created the launcher exits with ``ISOLATION_FAILED`` and the result says
why (never silently unconfined).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional

ISOLATION_FAILED = 97
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
CLONE_NEWPID = 0x20000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x1, 0x20, 0x1000, 0x4000, 0x40000
NOBODY = 65534


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 512
    file_mb: int = 16
    max_processes: int = 32
    output_bytes: int = 64 * 1024


@dataclass
class SandboxResult:
    returncode: Optional[int]
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def reason(self) -> str:
        if self.timed_out:
            return "wall-clock limit: process group killed"
        if self.returncode == ISOLATION_FAILED:
            return f"sandbox could not isolate: {self.stderr.strip()[-200:]}"
        if self.returncode is not None and self.returncode > 128:  # the launcher relays a signal
            return f"killed by {signal.Signals(self.returncode - 128).name} (a limit)"
        return f"exit status {self.returncode}"


def _work_root() -> str:
    """Outside /tmp when possible: /tmp is replaced by an empty tmpfs inside the sandbox."""
    for d in (os.environ.get("MEGATRON_RL_SANDBOX_ROOT"), "/var/tmp", tempfile.gettempdir()):
        if d and os.path.isdir(d) and os.access(d, os.W_OK):
            return d
    return tempfile.gettempdir()


def run_untrusted(code: str, stdin_text: str = "", limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``code`` (a Python program) confined; its stdout/stderr are truncated to
    ``limits.output_bytes``. Never raises for anything the program does."""
    work = tempfile.mkdtemp(prefix="mrl-sandbox-", dir=_work_root())
    try:
        with open(os.path.join(work, "main.py"), "w") as f:
            f.write(code)
        with open(os.path.join(work, "stdin.txt"), "w") as f:
            f.write(stdin_text)
        cfg = json.dumps({"work": work, "cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb,
                          "file_mb": limits.file_mb, "nproc": limits.max_processes})
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # no secrets of the trainer's
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-I", "-S", _LAUNCHER, cfg], cwd=work, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        cut = limits.output_bytes
        readers = [_BoundedReader(proc.stdout, cut), _BoundedReader(proc.stderr, cut)]
        timed_out = False
        try:
            proc.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc.pid)  # at the limit, or anything it left behind in its group
        proc.wait()
        out, err = (r.result() for r in readers)
        return SandboxResult(None if timed_out else proc.returncode, out, err, timed_out,
                             time.monotonic() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _BoundedReader:
    """Drains a pipe in a thread, keeping the first ``cut`` bytes: a program that floods its
    output cannot fill the trainer's memory (``communicate`` would keep every byte)."""

    def __init__(self, pipe, cut: int):
        self.pipe, self.cut, self.kept = pipe, cut, bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while chunk := self.pipe.read1(65536):
            room = self.cut - len(self.kept)
            if room > 0:
                self.kept += chunk[:room]

    def result(self) -> str:
        self.thread.join(timeout=5)  # the group is dead: the pipe closes
        self.pipe.close()
        return bytes(self.kept).decode("utf-8", "replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# The launcher is this file run as a script with -I -S (no environment variables, no site
# packages, no script dir on the path): it confines itself before any untrusted byte runs.
_LAUNCHER = os.path.abspath(__file__)


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        sys.stderr.write(f"{what}: {os.strerror(err)}\n")
        sys.stderr.flush()
        os._exit(ISOLATION_FAILED)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _limit(cfg) -> None:
    mb = 1024 * 1024
    for res, value in ((resource.RLIMIT_CPU, cfg["cpu_s"]), (resource.RLIMIT_AS, cfg["memory_mb"] * mb),
                       (resource.RLIMIT_FSIZE, cfg["file_mb"] * mb), (resource.RLIMIT_CORE, 0),
                       (resource.RLIMIT_NPROC, cfg["nproc"])):
        resource.setrlimit(res, (value, value))


def _private_mounts(libc, work: str) -> str:
    """New tmpfs over /tmp and /dev/shm, the interpreter's install bind-mounted (read-only)
    where an unprivileged user can reach it, a /proc of the new PID namespace. Returns the
    interpreter path to exec."""
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount private")
    for d in ("/tmp", "/dev/shm"):
        if os.path.isdir(d):
            _check(libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0, b"size=4m,mode=1777"), f"tmpfs {d}")
    py_root = "/tmp/.python"
    os.makedirs(py_root)
    _check(libc.mount(sys.base_prefix.encode(), py_root.encode(), None, MS_BIND | MS_REC, None),
           "bind python")
    _check(libc.mount(b"none", py_root.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None),
           "python read-only")
    _check(libc.mount(b"proc", b"/proc", b"proc", 0, None), "mount /proc")
    exe = os.path.join(py_root, "bin", os.path.basename(os.path.realpath(sys.executable)))
    return exe if os.path.exists(exe) else os.path.join(py_root, "bin", "python3")


def confine_and_exec(cfg_json: str) -> None:
    """In the launcher: new network, mount and PID namespaces; the child (PID 1 there) gets
    private mounts, drops to ``nobody`` (root) and its limits, then execs the untrusted program;
    the launcher waits and exits with its status."""
    cfg = json.loads(cfg_json)
    libc, work = _libc(), cfg["work"]
    root = os.geteuid() == 0
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | (0 if root else CLONE_NEWUSER)
    _check(libc.unshare(flags), "unshare(net, mount, pid)")
    if not root:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1")
        _write("/proc/self/gid_map", f"0 {gid} 1")
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status)
                 else 128 + os.WTERMSIG(status))
    exe = _private_mounts(libc, work)
    if root:
        for dirpath, _, files in os.walk(work):
            for f in [dirpath] + [os.path.join(dirpath, n) for n in files]:
                os.chown(f, NOBODY, NOBODY)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    _limit(cfg)
    os.dup2(os.open(os.path.join(work, "stdin.txt"), os.O_RDONLY), 0)
    os.chdir(work)
    env = {"PATH": "/usr/bin:/bin", "HOME": work, "LANG": "C.UTF-8"}
    lib = os.path.join(os.path.dirname(os.path.dirname(exe)), "lib")
    if os.path.isdir(lib):
        # a shared-libpython build (pyenv) finds libpython through an absolute RUNPATH into its
        # install, which the dropped user may not reach (/root is 0700); point it at the bind mount
        env["LD_LIBRARY_PATH"] = lib
    os.execve(exe, [exe, "-I", "-S", "-B", "main.py"], env)


if __name__ == "__main__":
    confine_and_exec(sys.argv[1])
