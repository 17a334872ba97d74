"""Hugging Face safetensors directories: a lazy reader and a streaming sharded writer.

The reader opens the files of ``model.safetensors.index.json`` (or one ``model.safetensors``)
memory-mapped and reads a tensor only when asked; it records which names were read, so that the
caller can prove every tensor was used. The writer takes tensors one at a time, flushes a shard
file when it reaches ``shard_bytes``, and writes the index last: a directory with an index is
complete. Only safetensors are read: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set

import torch

from megatron_rl.model.hf_config import read_config_json

Tensor = torch.Tensor
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# copied next to an export when present (tokenizer and generation settings travel with the weights)
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
              "added_tokens.json", "chat_template.jinja")


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2,
                "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


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
    """``add(name, tensor)`` in any order; ``close()`` writes the index. Shard files are named
    ``model-XXXXX.safetensors`` while writing and renamed to HF's ``-of-N`` names at the end."""

    def __init__(self, directory: os.PathLike, shard_bytes: int = 4 << 30):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        leftovers = [p.name for p in self.dir.glob("*.safetensors")] + (
            [INDEX] if (self.dir / INDEX).exists() else [])
        if leftovers:
            raise ValueError(f"{self.dir}: already holds {leftovers[0]}; export into an empty "
                             "directory (nothing there was changed)")
        self.shard_bytes = shard_bytes
        self._pending: Dict[str, Tensor] = {}
        self._pending_bytes = 0
        self._files: List[List[str]] = []
        self._names: Set[str] = set()
        self.total_bytes = 0
        self.count = 0

    def add(self, name: str, tensor: Tensor) -> None:
        """Queue a host copy of ``tensor`` under ``name`` (a name twice is a mapping bug); a shard
        is written when the next tensor would overflow it."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice (a mapping bug)")
        self._names.add(name)
        # a copy: views of a fused tensor share storage, which safetensors refuses
        t = tensor.detach().to("cpu", copy=True).contiguous()
        size = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + size > self.shard_bytes:
            self._flush()
        self._pending[name] = t
        self._pending_bytes += size
        self.total_bytes += size
        self.count += 1

    def _flush(self) -> None:
        from safetensors.torch import save_file

        i = len(self._files) + 1
        save_file(self._pending, str(self.dir / f".part-{i:05d}.safetensors"), metadata={"format": "pt"})
        self._files.append(sorted(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> Dict[str, str]:
        """Write what is pending, name the shards as HF does, and return the weight map (name ->
        file)."""
        if self._pending or not self._files:
            self._flush()
        n = len(self._files)
        weight_map = {}
        for i, names in enumerate(self._files, 1):
            final = SINGLE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f".part-{i:05d}.safetensors", self.dir / final)
            _normal_mode(self.dir / final)
            weight_map.update({k: final for k in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": dict(sorted(weight_map.items()))}
            tmp = self.dir / (INDEX + ".tmp")
            tmp.write_text(json.dumps(index, indent=2))
            os.replace(tmp, self.dir / INDEX)
        return weight_map


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
