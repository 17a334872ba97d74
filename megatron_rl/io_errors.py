"""A failed write (a full disk, a quota, a read-only or unwritable directory) said in one line.

megatron-core's checkpoint writer reports a full disk as ``RuntimeError: Worker failure: ...
unexpected pos 704 vs 598``, torch's as a ``CheckpointException`` holding each rank's exception,
TensorBoard from its writer thread, later: the errno is buried or lost. ``reported_writes``
turns any of them into ``WriteFailed`` naming the path and the errno, which the CLI prints as
one line and exits with ``EXIT_IO``. The errno comes from the exception chain when it is there,
else from a probe: writing (and syncing) a small file where the write failed reproduces it.
An exception that is not an I/O failure passes through unchanged (a bug keeps its traceback).
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

EXIT_IO = 74   # EX_IOERR: a write failed; rerunning will not help until the disk is fixed
IO_ERRNOS = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT", errno.EROFS: "EROFS",
             errno.EACCES: "EACCES", errno.EPERM: "EPERM", errno.EIO: "EIO", errno.EFBIG: "EFBIG"}
_PROBE_BYTES = 1 << 20


class WriteFailed(Exception):
    """One line: what was being written, where, and the errno (``of``)."""

    @classmethod
    def of(cls, what: str, path: os.PathLike, err: OSError, after: str = "") -> "WriteFailed":
        """The one-line failure of writing ``what`` to ``path``, naming the errno and what to do."""
        name = IO_ERRNOS.get(err.errno, str(err.errno))
        return cls(f"writing {what} to {path} failed: {os.strerror(err.errno)} ({name})"
                   + (f"; {after}" if after else ""))


def _os_error_in(exc: BaseException, depth: int = 0) -> Optional[OSError]:
    """An OSError with a known errno anywhere in ``exc``'s cause chain, or in the per-rank
    failures torch's ``CheckpointException`` carries."""
    if exc is None or depth > 8:
        return None
    if isinstance(exc, OSError) and exc.errno in IO_ERRNOS:
        return exc
    # Rust libraries (safetensors) raise their own type; std::io::Error's text ends "(os error N)"
    rust = re.search(r"\(os error (\d+)\)", str(exc)) if not isinstance(exc, OSError) else None
    if rust and int(rust.group(1)) in IO_ERRNOS:
        code = int(rust.group(1))
        return OSError(code, os.strerror(code))
    for inner in (exc.__cause__, exc.__context__):
        found = _os_error_in(inner, depth + 1)
        if found is not None:
            return found
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        for inner in failures.values():
            if isinstance(inner, BaseException):
                found = _os_error_in(inner, depth + 1)
            else:   # torch keeps (exception, traceback) pairs on some versions
                found = next((_os_error_in(x, depth + 1) for x in inner
                              if isinstance(x, BaseException)), None) if isinstance(inner, tuple) else None
            if found is not None:
                return found
    return None


def probe(directory: os.PathLike) -> Optional[OSError]:
    """The error a small synced write into ``directory`` (or its nearest existing parent) gets."""
    d = Path(directory)
    while not d.exists() and d != d.parent:
        d = d.parent
    f = d / f".write-probe-{os.getpid()}"
    try:
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * _PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        return e if e.errno in IO_ERRNOS else None
    finally:
        try:
            f.unlink()
        except OSError:
            pass
    return None


def diagnose(what: str, path: os.PathLike, exc: BaseException, after: str = "") -> Optional[WriteFailed]:
    """A ``WriteFailed`` if ``exc`` (or a probe of ``path``) shows a known I/O error, else None."""
    err = _os_error_in(exc) or probe(path)
    return None if err is None else WriteFailed.of(what, path, err, after)


@contextmanager
def reported_writes(what: str, path: os.PathLike, after: str = "") -> Iterator[None]:
    """Inside: an I/O failure becomes ``WriteFailed`` (``after``: what the user should know,
    e.g. which checkpoint is intact); anything else is re-raised as it is."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 -- torch's CheckpointException is a BaseException
        failed = diagnose(what, path, e, after)
        if failed is None:
            raise
        raise failed from None
