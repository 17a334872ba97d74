"""Built micro-batches live on the requested device (token-budget packing: tests/unit/test_batch_plan.py)."""

import pytest


def _tensors(obj, seen=None):
    """Every tensor reachable from a dataclass-like object (fields, lists, nested objects)."""
    import dataclasses

    import torch

    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x, seen)
    elif hasattr(obj, "__dict__") and id(obj) not in seen and not isinstance(obj, type):
        seen.add(id(obj))
        fields = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else list(vars(obj))
        for name in fields:
            yield from _tensors(getattr(obj, name), seen)


@pytest.mark.parametrize("packed", [False, True])
def test_built_micro_batch_lives_entirely_on_the_requested_device(packed):
    """The GPU path: every tensor the model, the loss and the CP bookkeeping read must be on the
    training device (the meta device stands in for CUDA here: a tensor left behind stays on CPU)."""
    import torch

    from megatron_rl.train.batches import build_micro_batch

    seqs = [{"tokens": torch.arange(n), "loss_mask": (torch.arange(n) >= 2).float(),
             "old_logprobs": -torch.rand(n), "advantages": torch.randn(n),
             "ref_logprobs": -torch.rand(n)} for n in (5, 8, 3)]
    mb = build_micro_batch(seqs, torch.tensor([0, 0, 1]), packed=packed, device="meta")
    found = list(_tensors(mb))
    assert len(found) >= 10
    assert {t.device.type for t in found} == {"meta"}
    cpu = build_micro_batch(seqs, torch.tensor([0, 0, 1]), packed=packed)
    assert {t.device.type for t in _tensors(cpu)} == {"cpu"}
