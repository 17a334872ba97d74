"""Reading boxes of a checkpoint (checkpoint.partial_load): each box gets exactly the saved
values, twice-asked boxes both, and a box the checkpoint does not fully hold is refused instead
of keeping uninitialised memory. Reference: the saved tensor sliced."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata,
                                                   TensorProperties, TensorStorageMetadata)

from megatron_rl.checkpoint.partial_load import CheckpointReader, _BoxPlanner, read_boxes


@pytest.fixture()
def saved(tmp_path):
    w = torch.arange(4 * 6 * 5, dtype=torch.float32).reshape(4, 6, 5)
    b = torch.arange(7, dtype=torch.float32) * -1
    dcp.save({"w": w, "b": b}, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    return tmp_path, w, b


def test_boxes_get_the_saved_values_and_a_twice_asked_box_fills_both(saved):
    path, w, b = saved
    boxes = [("w", (1, 2, 0), torch.full((2, 3, 5), float("nan"))),
             ("w", (0, 0, 0), torch.full((1, 6, 5), float("nan"))),
             ("w", (1, 2, 0), torch.full((2, 3, 5), float("nan"))),
             ("b", (3,), torch.full((4,), float("nan")))]
    reader = CheckpointReader(path)
    read_boxes(reader, boxes)
    read_boxes(reader, [])                     # nothing to read: no plan, no error
    assert torch.equal(boxes[0][2], w[1:3, 2:5])
    assert torch.equal(boxes[1][2], w[0:1])
    assert torch.equal(boxes[2][2], w[1:3, 2:5])
    assert torch.equal(boxes[3][2], b[3:])


def test_a_box_outside_the_tensor_or_of_an_unknown_key_is_refused(saved):
    path, _, _ = saved
    with pytest.raises(ValueError, match="lies outside"):
        read_boxes(CheckpointReader(path), [("w", (3, 0, 0), torch.empty(2, 6, 5))])
    with pytest.raises(ValueError, match="no tensor nope"):
        read_boxes(CheckpointReader(path), [("nope", (0,), torch.empty(1))])


def test_a_box_the_checkpoint_holds_only_in_part_is_refused():
    """Saved chunks cover rows 0-1 of 4: a box over rows 0-3 would keep garbage in rows 2-3."""
    md = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([4, 6]),
                               [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 6]))])
    planner = _BoxPlanner([("w", (0, 0), torch.empty(4, 6))])
    planner.set_up_planner({}, Metadata(state_dict_metadata={"w": md}))
    with pytest.raises(ValueError, match="holds 12 of the 24 elements"):
        planner.create_local_plan()
    whole = _BoxPlanner([("w", (0, 0), torch.empty(2, 6))])
    whole.set_up_planner({}, Metadata(state_dict_metadata={"w": md}))
    assert len(whole.create_local_plan().items) == 1
