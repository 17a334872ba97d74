"""Worker for test_export_memory: a fresh process exports a 231 MB model under a memory limit
set when the HF writer is created, while a thread samples its anonymous resident memory
(``RssAnon``: heap and tensors, not the page cache of the files it reads or writes)."""

from __future__ import annotations

import threading
import time

import megatron_rl.checkpoint.convert as convert
from megatron_rl.checkpoint.convert import export_hf, import_hf


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes: ``RssAnon`` (anonymous resident memory) or
    ``VmData`` (private writable memory: what ``RLIMIT_DATA`` limits)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class _Sampler:
    """The peak of ``RssAnon`` from ``start`` on, sampled every millisecond on a thread."""

    def __init__(self):
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.base = self.peak = status_bytes("RssAnon")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status_bytes("RssAnon"))
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, status_bytes("RssAnon")) - self.base


def _export_under_limit(hook: str, limit: int, *args, **kwargs) -> dict:
    """``export_hf(*args, **kwargs)`` under ``RLIMIT_DATA`` of ``limit`` bytes more than the
    process has when it first calls ``convert.<hook>`` (``HFWriter``: the writing alone;
    ``build_model``: everything after the process groups, whose threads' stacks count too).
    Returns the error, if any, and the anonymous memory added from then on."""
    import resource

    sampler, real = _Sampler(), getattr(convert, hook)
    hard = resource.getrlimit(resource.RLIMIT_DATA)

    def limited(*a, **kw):
        sampler.start()
        resource.setrlimit(resource.RLIMIT_DATA, (status_bytes("VmData") + limit, hard[1]))
        return real(*a, **kw)

    setattr(convert, hook, limited)
    error = ""
    try:
        export_hf(*args, shard_bytes=1 << 30, **kwargs)
    except (MemoryError, RuntimeError, ValueError) as e:
        error = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, hard)
        setattr(convert, hook, real)
    return {"growth": sampler.stop(), "error": error}


def export_growth(rank: int, world: int, hf_dir: str, tmp: str, limit: int) -> dict:
    """Import ``hf_dir``, then export it whole with a 1 GB shard budget (one file: a writer
    holding its shard holds the whole model) under ``limit`` from the writer's creation on: the
    writing's growth and error, if any."""
    import_hf(hf_dir, f"{tmp}/mc", check=False)
    return _export_under_limit("HFWriter", limit, f"{tmp}/mc", f"{tmp}/out", stream=False)


def import_and_export(rank: int, world: int, hf_dir: str, tmp: str) -> None:
    """The checkpoint and the whole-model export without a limit (the reference files)."""
    import_hf(hf_dir, f"{tmp}/mc", check=False)
    export_hf(f"{tmp}/mc", f"{tmp}/reference", shard_bytes=1 << 30, stream=False)


def export_under_limit(rank: int, world: int, tmp: str, limit: int, stream: bool) -> dict:
    """In a fresh process (freed memory another export left in the heap would hide the model's),
    export ``tmp/mc`` under ``limit``, streamed or whole; whether its files equal the reference's."""
    out = f"{tmp}/{'streamed' if stream else 'whole'}"
    r = _export_under_limit("build_model", limit, f"{tmp}/mc", out, stream=stream)
    return {**r, "same": not r["error"] and _same_files(f"{tmp}/reference", out)}


def _same_files(a: str, b: str) -> bool:
    import filecmp
    import os

    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and all(
        filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


def streamed_equals_whole(rank: int, world: int, hf_dir: str, tmp: str, layout: dict) -> bool:
    """Import at ``layout``, export whole and streamed at the same layout: identical files."""
    from megatron_rl.parallel.config import Layout

    lay = Layout(**layout)
    import_hf(hf_dir, f"{tmp}/mc", layout=lay, check=False)
    export_hf(f"{tmp}/mc", f"{tmp}/whole", layout=lay, stream=False)
    export_hf(f"{tmp}/mc", f"{tmp}/streamed", layout=lay, stream=True)
    return _same_files(f"{tmp}/whole", f"{tmp}/streamed") if rank == 0 else True
