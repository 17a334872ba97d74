"""Hugging Face safetensors directories: a lazy reader and a streaming sharded writer.

The reader opens the files of ``model.safetensors.index.json`` (or one ``model.safetensors``)
memory-mapped and reads a tensor only when asked; it records which names were read, so that the
caller can prove every tensor was used. The writer is given every tensor's name, shape and dtype
first (the export's plan), lays the shard files out, then writes each tensor into its place as it
arrives, holding none; the index comes last: a directory with an index is complete. Only
safetensors are read: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set

import torch

from megatron_rl.checkpoint.safetensors_stream import DTYPE_NAMES, Entry, SafetensorsFile, nbytes
from megatron_rl.model.hf_config import read_config_json

Tensor = torch.Tensor
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# copied next to an export when present (tokenizer and generation settings travel with the weights)
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
              "added_tokens.json", "chat_template.jinja")


# a safetensors dtype name -> bytes per element, from the writer's table of the same names
_DTYPE_BYTES = {name: nbytes((), dtype) for dtype, name in DTYPE_NAMES.items()}


class HFReader:
    """Reads a Hugging Face directory's safetensors (one file or an index of shards) by tensor name,
    remembering what was read."""
    def __init__(self, directory: os.PathLike):
        from safetensors import safe_open

        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ValueError(f"{self.dir}: not a directory (give a Hugging Face model directory)")
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map values must be file names")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
                    AttributeError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e!r})") from None
        elif (self.dir / SINGLE).is_file():
            weight_map = None
        else:
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = (f" (found {bins[0]}: pickled PyTorch weights are not loaded; re-save with "
                    "save_pretrained(..., safe_serialization=True))" if bins else "")
            raise ValueError(f"{self.dir}: no {INDEX} or {SINGLE}{hint}")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        self._handles = {}
        for f in files:
            path = self.dir / f
            if not path.is_file():
                raise ValueError(f"{index}: names {f}, which is missing from {self.dir}")
            try:
                self._handles[f] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        if weight_map is None:
            weight_map = {k: SINGLE for k in self._handles[SINGLE].keys()}
        else:
            _check_index(index, weight_map, {f: set(h.keys()) for f, h in self._handles.items()})
        self.weight_map: Dict[str, str] = weight_map
        self.read: Set[str] = set()

    def names(self) -> List[str]:
        """Every tensor name in the directory, sorted."""
        return sorted(self.weight_map)

    def shape(self, name: str) -> List[int]:
        """The shape of tensor ``name``, read from the file header (no data)."""
        return list(self._handle(name).get_slice(name).get_shape())

    def shape_bytes(self, name: str) -> int:
        """The bytes tensor ``name`` takes, from the header (no data)."""
        sl = self._handle(name).get_slice(name)
        n = 1
        for d in sl.get_shape():
            n *= d
        return n * _DTYPE_BYTES.get(sl.get_dtype(), 4)

    def get(self, name: str) -> Tensor:
        """Tensor ``name`` (read now; recorded as read)."""
        t = self._handle(name).get_tensor(name)
        self.read.add(name)
        return t

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise KeyError(name)
        return self._handles[self.weight_map[name]]

    def config(self) -> Dict:
        """The directory's ``config.json``; a missing file fails in one line."""
        if not (self.dir / "config.json").is_file():
            raise ValueError(f"{self.dir}: no config.json")
        return read_config_json(self.dir / "config.json")


def _check_index(index: Path, weight_map: Dict[str, str], held: Dict[str, Set[str]]) -> None:
    """Every tensor the index names is in the shard it names (a stale or hand-edited index
    otherwise fails deep inside safetensors, or reads the wrong tensor)."""
    wrong = sorted(n for n, f in weight_map.items() if n not in held[f])
    if wrong:
        n = wrong[0]
        where = [f for f, names in held.items() if n in names]
        found = f" (it is in {where[0]})" if where else " (no shard holds it)"
        raise ValueError(f"{index}: maps {len(wrong)} tensor(s) to a shard that does not hold "
                         f"them, e.g. {n} -> {weight_map[n]}{found}; the index does not match "
                         "the shard files")


class HFWriter:
    """An HF safetensors directory of the tensors ``layout`` names (``(name, shape, dtype)`` in
    file order), cut into files of at most ``shard_bytes`` (a larger tensor alone). ``add(name,
    tensor)`` in any order writes the tensor into its file at once (``SafetensorsFile``: nothing is
    held); ``close()`` checks every tensor came and writes the index (with more than one file)."""

    def __init__(self, directory: os.PathLike, layout: Sequence[Entry],
                 shard_bytes: int = 4 << 30):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        leftovers = [p.name for p in self.dir.glob("*.safetensors")] + (
            [INDEX] if (self.dir / INDEX).exists() else [])
        if leftovers:
            raise ValueError(f"{self.dir}: already holds {leftovers[0]}; export into an empty "
                             "directory (nothing there was changed)")
        files: List[List[Entry]] = [[]]
        size = 0
        for entry in layout:
            n = nbytes(entry[1], entry[2])
            if files[-1] and size + n > shard_bytes:
                files.append([])
                size = 0
            files[-1].append(entry)
            size += n
        k = len(files)
        names = [SINGLE] if k == 1 else [f"model-{i:05d}-of-{k:05d}.safetensors"
                                         for i in range(1, k + 1)]
        self._files = [SafetensorsFile(self.dir / f, entries) for f, entries in zip(names, files)]
        self.weight_map = {e[0]: f for f, entries in zip(names, files) for e in entries}
        if len(self.weight_map) < len(layout):
            raise ValueError("a tensor name is laid out twice (a mapping bug)")
        self._file_of = {e[0]: self._files[i] for i, entries in enumerate(files) for e in entries}
        self.total_bytes = sum(nbytes(e[1], e[2]) for e in layout)
        self.count = 0

    def add(self, name: str, tensor: Tensor) -> None:
        """Write ``tensor`` (its laid-out shape and dtype) into its file; a file is closed when
        its last tensor arrives."""
        f = self._file_of.get(name)
        if f is None:
            raise ValueError(f"tensor {name!r} is not in the export's layout (a mapping bug)")
        f.write(name, tensor)
        self.count += 1
        if f.complete:
            f.close()

    def close(self) -> Dict[str, str]:
        """Check every file is whole, give them a plain file's mode, write the index; returns the
        weight map (name -> file)."""
        try:
            for f in self._files:
                f.close()
        finally:
            for f in self._files:
                f.abort()
        for f in self._files:
            _normal_mode(f.path)
        if len(self._files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": dict(sorted(self.weight_map.items()))}
            tmp = self.dir / (INDEX + ".tmp")
            tmp.write_text(json.dumps(index, indent=2))
            os.replace(tmp, self.dir / INDEX)
        return self.weight_map

    def abort(self) -> None:
        """Close every open file (the caller removes the directory)."""
        for f in self._files:
            f.abort()


def _normal_mode(path: Path) -> None:
    """safetensors creates its files readable by the owner alone; an exported model is meant to
    be shared (served, uploaded, read by a teammate): the mode a plain new file gets."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def copy_side_files(src: Optional[os.PathLike], dst: os.PathLike,
                    names: Iterable[str] = SIDE_FILES) -> List[str]:
    """Copy the tokenizer / generation files that exist in ``src``; returns their names."""
    if src is None:
        return []
    copied = []
    for n in names:
        p = Path(src) / n
        if p.is_file():
            shutil.copyfile(p, Path(dst) / n)
            copied.append(n)
    return copied
