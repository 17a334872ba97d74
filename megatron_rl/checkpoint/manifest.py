"""Checkpoint manifests: every file of a checkpoint with its size and SHA-256.

The manifest is the last file written into a checkpoint's temporary directory, so a directory
with a manifest that matches its files is complete and unaltered: a truncated, altered or missing
file is found before anything is loaded, and named. Hashing is split over the ranks (file ``i`` of
the sorted list goes to rank ``i % world``), so a large checkpoint is hashed in parallel, each
rank reading ``1 / world`` of the bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

MANIFEST = "manifest.json"
HASH_THREADS = 4     # per rank: ranks already split the files (``my_share``)
_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded; the message names the directory and the file."""


def checkpoint_files(root: Path) -> List[str]:
    """Every regular file under ``root`` (relative, sorted), except the manifest itself."""
    out = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), root)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def my_share(files: List[str], rank: int, world: int) -> List[str]:
    """This rank's share of ``files`` (every ``world``-th, from ``rank``) for parallel hashing."""
    return files[rank::world]


def digest(path: Path) -> Dict[str, object]:
    """Size and SHA-256 of one file."""
    with open(path, "rb") as f:
        h = hashlib.file_digest(f, "sha256")
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def digests(root: Path, files: List[str]) -> Dict[str, Dict[str, object]]:
    """``digest`` of each of ``files`` under ``root``, by relative path."""
    return dict(zip(files, _threaded(lambda rel: digest(root / rel), files)))


def _threaded(fn, items: List[str]) -> list:
    """``[fn(x) for x in items]``, a few files at a time: hashlib and file reads release the GIL,
    so a rank's share of a checkpoint (its ``torch_dist`` writer's files, each up to GBs) hashes
    on several cores."""
    if len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(len(items), HASH_THREADS)) as pool:
        return list(pool.map(fn, items))


def write_manifest(root: Path, entries: Dict[str, Dict[str, object]], run_id: str = "") -> None:
    """Write the manifest (sizes and hashes) of a checkpoint atomically (temporary file, then
    rename)."""
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"version": _VERSION, "run_id": run_id,
                               "files": dict(sorted(entries.items()))}, indent=1))
    os.replace(tmp, root / MANIFEST)


def check_one_run(root: Path) -> None:
    """A verified checkpoint's trainer state was written by the run that sealed it (both record
    the run id): files of two runs under one manifest are refused."""
    state_file = root / "trainer_state.json"
    try:
        sealed = json.loads((root / MANIFEST).read_text()).get("run_id", "")
        written = json.loads(state_file.read_text()).get("run_id", "") if state_file.is_file() else ""
    except (OSError, ValueError, AttributeError):
        raise CheckpointError(f"checkpoint {root}: trainer_state.json is not the JSON it wrote") from None
    if sealed and written and sealed != written:
        raise CheckpointError(f"checkpoint {root}: mixes two runs (trainer_state.json from run "
                              f"{written}, sealed by run {sealed}); never resume from it")


def read_manifest(root: Path) -> Dict[str, Dict[str, object]]:
    """The manifest's file entries; a missing or unreadable manifest is a ``CheckpointError`` naming
    the directory."""
    f = root / MANIFEST
    if not f.is_file():
        raise CheckpointError(f"checkpoint {root}: no {MANIFEST} (the checkpoint was not completed, "
                              "or was not written by megatron_rl)")
    try:
        data = json.loads(f.read_text())
        files = data["files"]
        for rel, e in files.items():
            if not (isinstance(rel, str) and isinstance(e["size"], int) and isinstance(e["sha256"], str)):
                raise TypeError(rel)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {root}: {MANIFEST} is damaged (not the JSON it wrote)") from None
    for rel in files:
        if os.path.isabs(rel) or ".." in Path(rel).parts:
            raise CheckpointError(f"checkpoint {root}: {MANIFEST} names a path outside the "
                                  f"checkpoint ({rel!r})")
    return files


def check_files(root: Path, expected: Dict[str, Dict[str, object]], files: List[str]) -> List[str]:
    """What is wrong with ``files`` (a share of the manifest's keys), one line each."""
    def problem(rel: str) -> str:
        """What is wrong with one file ('' when nothing)."""
        want, path = expected[rel], root / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return (f"{rel} is {'truncated' if size < want['size'] else 'longer than written'} "
                    f"({size} of {want['size']} bytes)")
        if digest(path)["sha256"] != want["sha256"]:
            return f"{rel} was altered (its SHA-256 differs from {MANIFEST})"
        return ""

    return [p for p in _threaded(problem, files) if p]


def problem_message(root: Path, problems: List[str]) -> str:
    """One line naming the checkpoint, its first problem and how many more there are."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"checkpoint {root}: {problems[0]}{more}"
