"""Versioned weight buckets from trainer rank 0 to every engine rank over the ``weights`` bridge
(``parallel.roles``), for separate placement.

A version is a sequence of buckets, each one broadcast from bridge rank 0 in three messages: a
header ``int64 [version, meta bytes, payload bytes, last]``, the pickled ``[(name, shape, dtype)]``
of its tensors, and their raw bytes back to back. ``version < 0`` is the stop message, carrying the
trainer's exit status (the engine ranks end with the same one). Weights move
outside autograd: backward convention none. The receiver copies each payload out, so a bucket's
memory is released on both sides as soon as it has crossed.

Shapes: ``P`` payload bytes of one bucket.
"""

from __future__ import annotations

import pickle
from typing import Iterable, List, NamedTuple, Tuple

import torch

Tensor = torch.Tensor
STOP = -1


def _broadcast(group, t: Tensor) -> None:
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    group.broadcast([t], opts).wait()


def _as_bytes(t: Tensor) -> Tensor:
    return t.detach().contiguous().cpu().view(-1).view(torch.uint8)


def send_bucket(group, version: int, bucket: List[Tuple[str, Tensor]], last: bool) -> int:
    """Broadcast one bucket of ``version`` (bridge rank 0); returns its payload bytes."""
    meta = [(name, tuple(t.shape), str(t.dtype).replace("torch.", "")) for name, t in bucket]
    meta_bytes = torch.frombuffer(bytearray(pickle.dumps(meta)), dtype=torch.uint8)
    payload_P = torch.cat([_as_bytes(t) for _, t in bucket]) if bucket else torch.empty(0, dtype=torch.uint8)
    _broadcast(group, torch.tensor([version, meta_bytes.numel(), payload_P.numel(), int(last)]))
    _broadcast(group, meta_bytes)
    _broadcast(group, payload_P)
    return int(payload_P.numel())


def send_stop(group, exit_code: int = 0) -> None:
    """Tell every engine rank that no version follows, and how the trainer ends."""
    _broadcast(group, torch.tensor([STOP, 0, 0, exit_code]))


def send_version(group, version: int, buckets: Iterable[List[Tuple[str, Tensor]]]) -> Tuple[int, int]:
    """Every bucket of ``version``; returns ``(buckets, payload bytes)``. An empty model still
    sends one (empty, last) bucket, so the receiver always sees the version end."""
    count, total, pending = 0, 0, None
    for bucket in buckets:
        if pending is not None:
            total += send_bucket(group, version, pending, last=False)
            count += 1
        pending = bucket
    total += send_bucket(group, version, pending or [], last=True)
    return count + 1, total


class Received(NamedTuple):
    """A whole version (``tensors``), or the stop message (``version == STOP``, ``exit_code``)."""
    version: int
    tensors: List[Tuple[str, Tensor]]
    exit_code: int = 0


def recv_bucket(group) -> Tuple[int, List[Tuple[str, Tensor]], int]:
    """One bucket from bridge rank 0: ``(version, [(name, tensor)], last)``; for the stop message
    ``(STOP, [], exit code)``."""
    header = torch.zeros(4, dtype=torch.int64)
    _broadcast(group, header)
    version, meta_n, payload_n, last = (int(x) for x in header)
    if version < 0:
        return STOP, [], last
    meta_bytes = torch.empty(meta_n, dtype=torch.uint8)
    _broadcast(group, meta_bytes)
    payload_P = torch.empty(payload_n, dtype=torch.uint8)
    _broadcast(group, payload_P)
    out, at = [], 0
    for name, shape, dtype in pickle.loads(meta_bytes.numpy().tobytes()):
        dt = getattr(torch, dtype)
        n = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dt).element_size()
        out.append((name, payload_P[at:at + n].view(dt).reshape(shape)))
        at += n
    return version, out, last


def recv_version(group) -> Received:
    """The next whole version, or the stop message."""
    tensors: List[Tuple[str, Tensor]] = []
    while True:
        version, bucket, last = recv_bucket(group)
        if version == STOP:
            return Received(STOP, [], last)
        tensors += bucket
        if last:
            return Received(version, tensors)

