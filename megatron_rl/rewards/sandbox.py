"""Run untrusted (model-generated) Python in a contained child process.

The parent starts ``python -I -S <this file> CONFIG`` in a new session with an empty
environment, stdin closed. The launcher imports the standard library only (not this package,
whose ``__init__`` pulls in torch: seconds of start-up inside the wall-clock limit). It confines
itself, then ``exec``s the interpreter on the untrusted program:

- namespaces: network (only a loopback that is down), mount, PID, IPC (SysV shared memory,
  semaphores and message queues die with it), as root directly, otherwise inside a new user
  namespace;
- filesystem: a new root (``pivot_root``, the host's tree detached) holding only what the
  interpreter needs, read-only (``/usr``, ``/bin``, ``/lib*``, ``/etc``, the Python install at its
  own path), ``/dev/null``, ``zero``, ``random``, ``urandom``, a ``/proc`` of its own PID
  namespace, the program's directory at ``/work`` (writable), and fresh tmpfs at ``/tmp``,
  ``/var/tmp``, ``/dev/shm`` and ``/run/lock``. No host directory a program could write, and no
  host unix socket (``/run``, ``/var/run``, ``/tmp``, home directories) is in it, so nothing
  persists and two sandboxes cannot see each other;
- privileges: as root the program runs as ``nobody``; every capability is dropped (bounding set
  too) and ``no_new_privs`` is set, so a program cannot undo the read-only mounts either;
- resources: ``RLIMIT_CPU`` (CPU seconds), ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE`` (file size),
  ``RLIMIT_NPROC`` (fork bombs: enforced for the unprivileged user), no core files;
- time and clean-up: the launcher reports the host PID of the namespace's first process (its
  init); the parent holds a pidfd on it and kills it at the wall-clock limit and at the end,
  which kills every process in the namespace (``setsid`` or daemonised alike), then the
  launcher's process group.

If a namespace cannot be created the launcher exits with ``ISOLATION_FAILED`` and the result says
why (never silently unconfined).
"""

from __future__ import annotations

import ctypes
import errno
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
CLONE_NEWPID, CLONE_NEWIPC = 0x20000000, 0x08000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    0x1, 0x2, 0x4, 0x20, 0x1000, 0x4000, 0x40000)
MNT_DETACH, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 2, 38, 24
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}
NOBODY = 65534
# read-only in the new root, where they exist; top-level symlinks (merged /usr) are recreated
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
DEVICES = ("null", "zero", "random", "urandom")


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for untrusted code: wall and CPU time, memory, file size, processes, output."""
    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 512
    file_mb: int = 16
    max_processes: int = 32
    output_bytes: int = 64 * 1024


@dataclass
class SandboxResult:
    """What a sandboxed run returned: exit status, output, whether it timed out, and how long it
    took."""
    returncode: Optional[int]
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    pid_namespace: str = ""   # e.g. "pid:[4026532871]": every process the program started

    @property
    def ok(self) -> bool:
        """Exit 0 within the time limit."""
        return self.returncode == 0 and not self.timed_out

    def reason(self) -> str:
        """Why the run failed, in a few words."""
        if self.timed_out:
            return "wall-clock limit: process group killed"
        if self.returncode == ISOLATION_FAILED:
            return f"sandbox could not isolate: {self.stderr.strip()[-200:]}"
        if self.returncode is not None and self.returncode > 128:  # the launcher relays a signal
            return f"killed by {signal.Signals(self.returncode - 128).name} (a limit)"
        return f"exit status {self.returncode}"


def _work_root() -> str:
    """Where the programs' directories are made (``MEGATRON_RL_SANDBOX_ROOT``, else the temp
    dir); a program sees only its own, as ``/work``."""
    d = os.environ.get("MEGATRON_RL_SANDBOX_ROOT")
    return d if d and os.path.isdir(d) and os.access(d, os.W_OK) else tempfile.gettempdir()


def run_untrusted(code: str, stdin_text: str = "", limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``code`` (a Python program) confined; its stdout/stderr are truncated to
    ``limits.output_bytes``. Never raises for anything the program does."""
    work = tempfile.mkdtemp(prefix="mrl-sandbox-", dir=_work_root())
    report_r, report_w = os.pipe()
    try:
        box = os.path.join(work, "box")
        os.makedirs(box)
        os.makedirs(os.path.join(work, "root"))
        with open(os.path.join(box, "main.py"), "w") as f:
            f.write(code)
        with open(os.path.join(box, "stdin.txt"), "w") as f:
            f.write(stdin_text)
        cfg = json.dumps({"work": work, "cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb,
                          "file_mb": limits.file_mb, "nproc": limits.max_processes,
                          "report_fd": report_w})
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # no secrets of the trainer's
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-I", "-S", _LAUNCHER, cfg], cwd=work, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,
                                pass_fds=(report_w,))
        os.close(report_w)
        report_w = -1
        init = _NamespaceInit(report_r)
        cut = limits.output_bytes
        readers = [_BoundedReader(proc.stdout, cut), _BoundedReader(proc.stderr, cut)]
        timed_out = False
        try:
            proc.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        init.kill()            # the namespace's init: every process the program started dies
        _kill_group(proc.pid)  # the launcher, at the limit
        proc.wait()
        out, err = (r.result() for r in readers)
        return SandboxResult(None if timed_out else proc.returncode, out, err, timed_out,
                             time.monotonic() - t0, init.namespace)
    finally:
        for fd in (report_r, report_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(work, ignore_errors=True)


class _NamespaceInit:
    """The host PID of the sandbox's PID-namespace init, as the launcher reports it (a line on a
    pipe), held as a pidfd at once: killing it later cannot hit a process that reused the PID."""

    def __init__(self, report_fd: int):
        self.pidfd, self.namespace = -1, ""
        self._thread = threading.Thread(target=self._read, args=(report_fd,), daemon=True)
        self._thread.start()

    def _read(self, fd: int) -> None:
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(fd, 64)   # ends when the launcher exits (its copy of the pipe closes)
            if not chunk:
                return
            data += chunk
        try:
            pid = int(data)
            self.pidfd = os.pidfd_open(pid)
            self.namespace = os.readlink(f"/proc/{pid}/ns/pid")
        except (ValueError, OSError):
            pass   # gone already: its namespace went with it

    def kill(self) -> None:
        """Kill the namespace's init (and so every process in it)."""
        self._thread.join(timeout=2)
        if self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except OSError:
                pass
            os.close(self.pidfd)
            self.pidfd = -1


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
        """What the reader kept, decoded (the output limit applied)."""
        self.thread.join(timeout=5)  # the namespace is dead: the pipe closes
        if not self.thread.is_alive():   # else closing would wait on the reader's lock
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


def _mount(libc, src, dst: str, fstype, flags: int, data, what: str) -> None:
    enc = lambda x: None if x is None else x.encode()  # noqa: E731
    _check(libc.mount(enc(src), dst.encode(), enc(fstype), flags, enc(data)), what)


def _bind(libc, src: str, dst: str, read_only: bool) -> None:
    _mount(libc, src, dst, None, MS_BIND | MS_REC, None, f"bind {src}")
    if read_only:   # a bind mount takes its own flags on a remount; keep nosuid/nodev (locked)
        _mount(libc, None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV,
               None, f"read-only {src}")


def _new_root(libc, work: str, py_root: str) -> None:
    """Build the program's filesystem under ``<work>/root`` (see the module doc) and
    ``pivot_root`` into it; the host's tree is detached from this mount namespace."""
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount private")
    new = os.path.join(work, "root")
    _mount(libc, "tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755", "tmpfs root")
    bound = []
    for d in SYSTEM_DIRS + (py_root,):
        if os.path.islink(d) and os.path.dirname(d) == "/":
            os.symlink(os.readlink(d), new + d)
        elif os.path.isdir(d) and not any(d == b or d.startswith(b + "/") for b in bound):
            os.makedirs(new + d, exist_ok=True)
            _bind(libc, d, new + d, read_only=True)
            bound.append(d)
    os.makedirs(new + "/work")
    _bind(libc, os.path.join(work, "box"), new + "/work", read_only=False)
    for d in SCRATCH_DIRS:
        os.makedirs(new + d, exist_ok=True)
        _mount(libc, "tmpfs", new + d, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=1777", f"tmpfs {d}")
    for n in DEVICES:
        if os.path.exists(f"/dev/{n}"):
            open(f"{new}/dev/{n}", "w").close()
            _bind(libc, f"/dev/{n}", f"{new}/dev/{n}", read_only=False)
    os.makedirs(new + "/proc")
    _mount(libc, "proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV, None, "mount /proc")
    os.makedirs(new + "/.old")
    number = SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        _check(-1, f"pivot_root: unknown syscall number on {os.uname().machine}")
    _check(libc.syscall(number, new.encode(), (new + "/.old").encode()), "pivot_root")
    os.chdir("/")
    _check(libc.umount2(b"/.old", MNT_DETACH), "detach the host tree")
    os.rmdir("/.old")
    # the root itself read-only: nothing writable but /work and the scratch tmpfs
    _mount(libc, None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None, "read-only root")


def _drop_privileges(libc, root: bool) -> None:
    if root:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    for cap in range(64):   # the bounding set: an exec as (namespace) root regains nothing
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break           # past the last capability this kernel knows
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def confine_and_exec(cfg_json: str) -> None:
    """In the launcher: new network, mount, PID and IPC namespaces; the child (PID 1 there) gets
    its own root filesystem, drops to ``nobody`` (root) and every capability, takes its limits,
    then execs the untrusted program; the launcher reports the child's PID, waits and exits with
    its status."""
    cfg = json.loads(cfg_json)
    libc, work, report = _libc(), cfg["work"], cfg["report_fd"]
    root = os.geteuid() == 0
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | (0 if root else CLONE_NEWUSER)
    _check(libc.unshare(flags), "unshare(net, mount, pid, ipc)")
    if not root:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1")
        _write("/proc/self/gid_map", f"0 {gid} 1")
    pid = os.fork()
    if pid:
        os.write(report, f"{pid}\n".encode())
        os.close(report)
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status)
                 else 128 + os.WTERMSIG(status))
    os.close(report)   # before any untrusted byte: the program must not report a PID of its own
    exe = os.path.realpath(sys.executable)
    if root:
        for dirpath, _, files in os.walk(os.path.join(work, "box")):
            for f in [dirpath] + [os.path.join(dirpath, n) for n in files]:
                os.chown(f, NOBODY, NOBODY)
    _new_root(libc, work, sys.base_prefix)
    _drop_privileges(libc, root)
    _limit(cfg)
    os.dup2(os.open("/work/stdin.txt", os.O_RDONLY), 0)
    os.chdir("/work")
    env = {"PATH": "/usr/bin:/bin", "HOME": "/work", "LANG": "C.UTF-8"}
    os.execve(exe, [exe, "-I", "-S", "-B", "main.py"], env)


if __name__ == "__main__":
    confine_and_exec(sys.argv[1])
