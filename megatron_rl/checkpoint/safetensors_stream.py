"""A safetensors file written one tensor at a time, when every tensor's name, shape and dtype are
known before any data: the header first, then each tensor's bytes at its offset as it arrives.

``safetensors.torch.save_file`` takes the whole file's tensors at once and serialises them into
one buffer, so a writer built on it holds a shard (4 GB by default) plus that buffer. Here the
writer holds nothing: the caller's one tensor goes to the file with ``pwrite``. The format
(https://github.com/huggingface/safetensors, "Format"): 8 bytes little-endian header length, the
JSON header (padded with spaces to 8 bytes), then the data, each tensor's ``data_offsets`` counted
from the data's start, contiguous and covering it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Dict, Optional, Sequence, Set, Tuple

import torch

Tensor = torch.Tensor
Entry = Tuple[str, Tuple[int, ...], torch.dtype]      # name, shape, dtype

DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16",
               torch.float16: "F16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
               torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
               torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_MAX_WRITE = 1 << 30          # Linux writes at most 0x7ffff000 bytes per call: write in pieces


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype``."""
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


class SafetensorsFile:
    """``entries`` laid out in order; ``write(name, tensor)`` in any order; ``close()`` checks
    that every entry was written. The file is opened at the first write."""

    def __init__(self, path: os.PathLike, entries: Sequence[Entry],
                 metadata: Optional[Dict[str, str]] = None):
        self.path = Path(path)
        header: Dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._at: Dict[str, Tuple[int, Tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for name, shape, dtype in entries:
            if name in header:
                raise ValueError(f"tensor {name!r} laid out twice in {self.path.name} (a mapping bug)")
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"tensor {name!r}: safetensors has no dtype {dtype}")
            size = nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": [int(d) for d in shape],
                            "data_offsets": [offset, offset + size]}
            self._at[name] = (offset, tuple(int(d) for d in shape), dtype)
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._head = struct.pack("<Q", len(raw)) + raw
        self.size = len(self._head) + offset
        self._left: Set[str] = set(self._at)
        self._fd: Optional[int] = None
        self._closed = False

    @property
    def complete(self) -> bool:
        """Every entry has been written."""
        return not self._left

    def write(self, name: str, tensor: Tensor) -> None:
        """``tensor``'s bytes at ``name``'s offset (shape and dtype must be the laid-out ones)."""
        if name not in self._at:
            raise ValueError(f"tensor {name!r} is not laid out in {self.path.name} (a mapping bug)")
        if name not in self._left:
            raise ValueError(f"tensor {name!r} written twice (a mapping bug)")
        offset, shape, dtype = self._at[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, laid out "
                             f"as {shape} {dtype} (a mapping bug)")
        self._open()
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        _pwrite_all(self._fd, memoryview(data), len(self._head) + offset)
        self._left.discard(name)

    def _open(self) -> None:
        """Create the file at its full size with its header (once)."""
        if self._fd is None and not self._closed:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            os.ftruncate(self._fd, self.size)
            _pwrite_all(self._fd, memoryview(self._head), 0)

    def close(self) -> None:
        """Close the file; an entry never written is an error (the file would read as zeros)."""
        if self._left:
            self.abort()
            missing = sorted(self._left)
            raise ValueError(f"{self.path.name}: {len(missing)} laid-out tensor(s) never written, "
                             f"e.g. {missing[0]} (a mapping bug)")
        self._open()              # a file of no or empty tensors: its header alone
        self.abort()

    def abort(self) -> None:
        """Close the file descriptor, whatever was written."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._closed = True


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """All of ``data`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:done + _MAX_WRITE], offset + done)
        if n <= 0:
            raise OSError(f"pwrite wrote nothing at offset {offset + done}")
        done += n
