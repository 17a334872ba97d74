"""Loading a checkpoint runs no code from it.

Two readers under megatron-core's ``dist_checkpointing.load`` unpickle by default:
- torch's ``FileSystemReader.read_metadata`` reads ``.metadata`` with a plain ``pickle.load``
  (torch 2.13, distributed/checkpoint/filesystem.py): a crafted ``.metadata`` runs any code at
  load. Here it goes through an unpickler that constructs only the checkpoint-metadata classes
  torch itself writes there (the list is what torch 2.13 writes for our models), and refuses
  anything else naming the global it met.
- megatron-core reads ``common.pt`` with ``torch.load`` and no ``weights_only`` argument, which is
  safe only while torch's default (``weights_only=True`` since 2.6) is not overridden by
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``: inside ``safe_checkpoint_loads`` it is forced to True.

The manifest (``manifest.py``) detects damage, not malice (a forger rewrites it), so these hold
even for a checkpoint whose manifest checks out. Our own files are JSON, safetensors, or
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import types
from typing import Any, Iterator

import torch

_DCP = "torch.distributed.checkpoint."
_ALLOWED = {
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    _DCP + "metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                        "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                        "_MEM_FORMAT_ENCODING"},
    _DCP + "planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    _DCP + "filesystem": {"_StorageInfo"},
}
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asked the unpickler for something that is not checkpoint metadata."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        """Only the allowlisted classes (and torch dtype constants) may be unpickled."""
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"refused to unpickle {module}.{name} (checkpoint metadata "
                                    "holds only torch's own metadata classes)")


def load_metadata(stream) -> Any:
    """``pickle.load`` for a DCP ``.metadata`` stream, with the allowlist above."""
    data = stream.read()
    return _MetadataUnpickler(io.BytesIO(data)).load()


@contextlib.contextmanager
def safe_checkpoint_loads() -> Iterator[None]:
    """Scoped: DCP metadata through the allowlist, ``torch.load`` always ``weights_only=True``."""
    from torch.distributed.checkpoint import filesystem

    # only what filesystem.py calls (load, dump): any other use fails instead of unpickling
    shim = types.SimpleNamespace(load=load_metadata, dump=pickle.dump)
    original_pickle, original_load = filesystem.pickle, torch.load

    def weights_only_load(*args, **kwargs):
        """``torch.load`` with ``weights_only=True`` forced."""
        kwargs["weights_only"] = True
        return original_load(*args, **kwargs)

    filesystem.pickle, torch.load = shim, weights_only_load
    try:
        yield
    finally:
        filesystem.pickle, torch.load = original_pickle, original_load
