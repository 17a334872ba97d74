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


def export_growth(rank: int, world: int, hf_dir: str, tmp: str, limit: int) -> dict:
    """Import ``hf_dir``, then export it with a 1 GB shard budget (one file: a writer holding its
    shard holds the whole model): from the writer's creation on, the process runs under a memory
    limit of ``limit`` bytes more than it has (``RLIMIT_DATA``: allocations past it fail), and the
    anonymous memory the writing adds is measured. Returns the growth and the error, if any."""
    import resource

    import_hf(hf_dir, f"{tmp}/mc", check=False)
    sampler = _Sampler()
    real, hard = convert.HFWriter, resource.getrlimit(resource.RLIMIT_DATA)

    def writer(*a, **kw):
        sampler.start()
        resource.setrlimit(resource.RLIMIT_DATA, (status_bytes("VmData") + limit, hard[1]))
        return real(*a, **kw)

    convert.HFWriter = writer
    error = ""
    try:
        export_hf(f"{tmp}/mc", f"{tmp}/out", shard_bytes=1 << 30)
    except (MemoryError, RuntimeError) as e:
        error = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, hard)
        convert.HFWriter = real
    return {"growth": sampler.stop(), "error": error}


def _limited_export(ckpt: str, out: str, limit: int, stream: bool) -> dict:
    """Export ``ckpt`` under ``RLIMIT_DATA`` of ``limit`` bytes more than the process has when
    the model is built (after the process groups, whose threads' stacks count too); the error,
    if any, and the anonymous memory the export added from then on."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_DATA)
    sampler, real = _Sampler(), convert.build_model

    def build(*a, **kw):
        sampler.start()
        resource.setrlimit(resource.RLIMIT_DATA, (status_bytes("VmData") + limit, hard[1]))
        return real(*a, **kw)

    convert.build_model = build
    error = ""
    try:
        export_hf(ckpt, out, shard_bytes=1 << 30, stream=stream)
    except (MemoryError, RuntimeError, ValueError) as e:
        error = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, hard)
        convert.build_model = real
    return {"growth": sampler.stop(), "error": error}


def import_and_export(rank: int, world: int, hf_dir: str, tmp: str) -> None:
    """The checkpoint and the whole-model export without a limit (the reference files)."""
    import_hf(hf_dir, f"{tmp}/mc", check=False)
    export_hf(f"{tmp}/mc", f"{tmp}/reference", shard_bytes=1 << 30, stream=False)


def export_under_limit(rank: int, world: int, tmp: str, limit: int, stream: bool) -> dict:
    """In a fresh process (freed memory another export left in the heap would hide the model's),
    export ``tmp/mc`` under ``limit``, streamed or whole; whether its files equal the reference's."""
    out = f"{tmp}/{'streamed' if stream else 'whole'}"
    r = _limited_export(f"{tmp}/mc", out, limit, stream=stream)
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
