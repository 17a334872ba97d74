"""Load some of a model's tensors from a ``torch_dist`` checkpoint, on one rank, with no
collective: the streaming export's segments (``export_stream``).

megatron-core's ``dist_checkpointing.load`` cannot do this: it checks that the requested shards
cover every tensor (all layers of a layer-stacked key), and at a world of one it describes the
shards it was not asked for as this rank's own. Here each requested shard is a box (key, global
offsets, sizes) read by PyTorch's checkpoint reader through a planner that asks for exactly those
boxes (``create_read_items_for_chunk_list``, the same resharding reads megatron-core's loads use)
and writes them into the parameters' memory. Items are unpickled with ``weights_only=True``
(PyTorch's ``FileSystemReader``).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Dict, Iterable, List, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

Box = Tuple[str, Tuple[int, ...], torch.Tensor]   # (checkpoint key, global offsets, destination)


def _require_covered(key: str, parts, reads) -> None:
    """Every element of every box is read: a box the checkpoint covers only in part would keep
    uninitialised memory (the saved chunks are disjoint, so the read volumes add up exactly)."""
    got: Dict[Tuple[int, ...], int] = {}
    for r in reads:
        offsets = tuple(r.dest_index.offset)
        got[offsets] = got.get(offsets, 0) + math.prod(r.lengths)
    for offsets, dest in parts:
        if got.get(tuple(offsets), 0) != dest.numel():
            raise ValueError(f"{key}: the checkpoint holds {got.get(tuple(offsets), 0)} of the "
                             f"{dest.numel()} elements of the shard at {list(offsets)}")


class _BoxPlanner(DefaultLoadPlanner):
    """A load plan of exactly ``boxes``; every read lands in a view of its box's destination."""

    def __init__(self, boxes: List[Box]):
        super().__init__()
        self.boxes = boxes
        self.dest: Dict[Tuple[str, Tuple[int, ...]], torch.Tensor] = {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        """Keep the checkpoint's metadata; there is no state dict to flatten."""
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> LoadPlan:
        """The reads that fill every box (resharding as megatron-core's loads do)."""
        per_key: Dict[str, List[Tuple[Tuple[int, ...], torch.Tensor]]] = {}
        for key, offsets, dest in self.boxes:
            per_key.setdefault(key, []).append((offsets, dest))
            self.dest[(key, offsets)] = dest
        items = []
        for key, parts in per_key.items():
            md = self.metadata.state_dict_metadata.get(key)
            if md is None or not hasattr(md, "chunks"):
                raise ValueError(f"the checkpoint has no tensor {key}")
            for offsets, dest in parts:
                if len(offsets) != len(md.size) or any(
                        o + n > m for o, n, m in zip(offsets, dest.shape, md.size)):
                    raise ValueError(f"{key}: a shard at {list(offsets)} of {list(dest.shape)} "
                                     f"lies outside the checkpoint's {list(md.size)}")
            chunks = [ChunkStorageMetadata(torch.Size(o), d.shape) for o, d in parts]
            reads = create_read_items_for_chunk_list(key, md, chunks)
            _require_covered(key, parts, reads)
            items += reads
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        """One rank, no coordination."""
        return global_plan

    def finish_plan(self, central_plan):
        """The local plan as it is."""
        return central_plan

    def resolve_tensor(self, read_item):
        """The slice of the destination this read fills."""
        dest = self.dest[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, offset, length)
        return dest

    def commit_tensor(self, read_item, tensor) -> None:
        """Nothing: the reader copied into a view of the destination."""

    def load_bytes(self, read_item, value) -> None:
        """Boxes are tensors; a bytes item here is a bug."""
        raise ValueError(f"{read_item.dest_index.fqn}: not a tensor")


class CheckpointReader(FileSystemReader):
    """PyTorch's reader of a ``torch_dist`` directory that unpickles its ``.metadata`` once, for
    every part read through it (the whole checkpoint's metadata, per segment, both costs time
    and fragments the heap)."""

    def __init__(self, path: os.PathLike):
        super().__init__(str(path))
        self._metadata = None

    def read_metadata(self, *args, **kwargs):
        """The checkpoint's metadata, read on first use."""
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


def read_boxes(reader: CheckpointReader, boxes: Iterable[Box]) -> None:
    """Fill every box's destination from the checkpoint ``reader`` reads; local to this rank."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    first: Dict[Tuple[str, Tuple[int, ...]], torch.Tensor] = {}
    twins = []   # a box asked for twice (two parameters of one shard) is read once, then copied
    for key, offsets, dest in boxes:
        if (key, tuple(offsets)) in first:
            twins.append((first[(key, tuple(offsets))], dest))
        else:
            first[(key, tuple(offsets))] = dest
    if first:
        try:
            _load_state_dict({}, reader, no_dist=True,
                             planner=_BoxPlanner([(k, o, d) for (k, o), d in first.items()]))
        except CheckpointException as e:   # a BaseException carrying the rank's traceback
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise ValueError(lines[-1] if lines else "checkpoint read failed") from None
    for src, dest in twins:
        dest.copy_(src)


def model_boxes(sharded_state_dict) -> Tuple[List[Box], Callable[[], dict]]:
    """The boxes of a megatron-core model sharded state dict (its ``ShardedTensor`` entries and
    what its factories build), and ``merge()`` -> the plain state dict once they are filled."""
    from megatron.core.dist_checkpointing.dict_utils import (dict_list_map_inplace,
                                                             extract_matching_values,
                                                             nested_values)
    from megatron.core.dist_checkpointing.mapping import (ShardedTensor, ShardedTensorFactory,
                                                          apply_factories, apply_factory_merges)

    sd = dict(sharded_state_dict)
    factories, _ = extract_matching_values(sd, lambda x: isinstance(x, ShardedTensorFactory))
    apply_factories(sd)
    boxes = []
    for st in nested_values(sd):
        if not isinstance(st, ShardedTensor):
            raise ValueError(f"{st.key}: not a tensor; export without streaming")
        if st.flattened_range is not None:
            raise ValueError(f"{st.key}: a flattened shard; export without streaming")
        shape = (1,) * st.prepend_axis_num + tuple(st.local_shape)
        boxes.append((st.key, tuple(st.global_offset), st.data.view(shape)))

    def merge():
        """The plain state dict: filled tensors, factory parts merged back."""
        plain = dict_list_map_inplace(lambda x: x.data if isinstance(x, ShardedTensor) else x, sd)
        return apply_factory_merges(plain, factories)
    return boxes, merge
