"""Dataset files: which files ``data.path`` names, and the JSON objects each holds.

``data.path`` is a file (``.jsonl``, ``.json`` holding an array of objects, or ``.parquet``), a
directory (every such file in it, sorted: e.g. a folder of parquet shards), or a glob
(``data/train-*.parquet``). Objects come with their place (``file:line`` for JSONL, ``file:row``
otherwise) so that an error can name it. ``lookup`` reads a dotted key path (verl's
``reward_model.ground_truth``).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any, Iterator, List, Tuple

SUFFIXES = (".jsonl", ".json", ".parquet")
MISSING = object()   # what `lookup` returns for a key path that is not there


def data_files(path: str) -> List[Path]:
    """The files ``path`` names, in a fixed order; ``ValueError`` naming ``path`` otherwise."""
    if any(c in path for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not found:
            raise ValueError(f"{path} matches no file")
    elif Path(path).is_dir():
        found = sorted(p for p in Path(path).iterdir()
                       if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not found:
            raise ValueError(f"{path} is a directory with no {', '.join(SUFFIXES)} file")
    elif Path(path).is_file():
        found = [Path(path)]
    else:
        raise ValueError(f"{path} does not exist (a {'/'.join(SUFFIXES)} file, a directory of "
                         "them, a glob, or synthetic:<task>)")
    odd = [p for p in found if p.suffix.lower() not in SUFFIXES]
    if odd:
        raise ValueError(f"{odd[0]} is not a {'/'.join(SUFFIXES)} file")
    return found


def iter_objects(p: Path) -> Iterator[Tuple[str, Any, str]]:
    """``(place, object or None, error)`` for every row of one file."""
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_objects(p)
    elif suffix == ".json":
        yield from _json_array(p)
    else:
        yield from _parquet_objects(p)


def _jsonl_objects(path: Path):
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{line_no}", None, f"invalid UTF-8 at byte {e.start}"
                continue
            if not text.strip():
                continue
            try:
                yield f"{path}:{line_no}", json.loads(text), ""
            except json.JSONDecodeError as e:
                yield f"{path}:{line_no}", None, f"invalid JSON ({e.msg} at column {e.colno})"


def _json_array(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a .json dataset must hold an array of row objects, not a "
                         f"{type(data).__name__} (or use .jsonl, one object per line)")
    for i, obj in enumerate(data):
        yield f"{path}:row {i}", obj, ""


def _parquet_objects(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 -- pyarrow raises several types for a bad file
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    for i, obj in enumerate(table.to_pylist()):
        yield f"{path}:row {i}", obj, ""


def lookup(obj: dict, key: str) -> Any:
    """``obj[key]``, or the nested value of a dotted path (``reward_model.ground_truth``); a key
    that is itself dotted wins. ``MISSING`` when absent."""
    if key in obj:
        return obj[key]
    cur: Any = obj
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return MISSING
        cur = cur[part]
    return cur


def key_paths(obj: dict, depth: int = 2) -> List[str]:
    """The key paths of a row, nested dicts to ``depth`` (for error messages)."""
    out = []
    for k, v in obj.items():
        if isinstance(v, dict) and depth > 1 and v:
            out += [f"{k}.{sub}" for sub in key_paths(v, depth - 1)]
        else:
            out.append(str(k))
    return out
