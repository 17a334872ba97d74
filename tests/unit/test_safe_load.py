"""Loading a checkpoint executes nothing from it: torch's DCP ``.metadata`` goes through an
allowlist, and ``torch.load`` is forced to ``weights_only=True`` while a checkpoint loads."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from megatron_rl.checkpoint.safe_load import UnsafeCheckpointError, safe_checkpoint_loads


class _Payload:
    """Unpickling this runs ``os.system`` (what a forged checkpoint would carry)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_metadata_that_torch_writes_loads_through_the_allowlist(tmp_path):
    sd = {"w": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16), "n": 7}
    dcp.save(sd, checkpoint_id=str(tmp_path))
    with safe_checkpoint_loads():
        meta = FileSystemReader(str(tmp_path)).read_metadata()
    assert set(meta.state_dict_metadata) == {"w", "b", "n"}
    assert meta.state_dict_metadata["w"].size == torch.Size([3, 4])


def test_forged_metadata_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with safe_checkpoint_loads(), pytest.raises(UnsafeCheckpointError, match=r"refused to unpickle (posix|os)\.system"):
        FileSystemReader(str(tmp_path)).read_metadata()
    assert not marker.exists()


def test_torch_load_inside_is_weights_only_even_when_asked_otherwise(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(marker)}, tmp_path / "common.pt")
    with safe_checkpoint_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "common.pt", weights_only=False)
    assert not marker.exists()
    torch.save({"x": torch.ones(2)}, tmp_path / "ok.pt")
    with safe_checkpoint_loads():
        assert torch.equal(torch.load(tmp_path / "ok.pt")["x"], torch.ones(2))


def test_the_patches_are_scoped(tmp_path):
    from torch.distributed.checkpoint import filesystem

    before = (filesystem.pickle, torch.load)
    with safe_checkpoint_loads():
        assert filesystem.pickle is not before[0] and torch.load is not before[1]
    assert (filesystem.pickle, torch.load) == before
