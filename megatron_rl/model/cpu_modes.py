"""The process-wide torch function modes the CPU patches enter (``model.cpu_patches``: megatron-core
hard-codes CUDA devices and CUDA type names), and the two switches the step path uses around
them: ``cpu_modes_suspended`` for code with no Megatron in it, ``cpu_modes_resumed`` for Megatron
code called from inside such a stretch."""

from __future__ import annotations

import contextlib
from typing import Callable, List

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpu(TorchFunctionMode):
    """CUDA devices mapped to the CPU, ``.cuda()`` a no-op, ``pin_memory`` dropped."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


class CudaTypeNames(TorchFunctionMode):
    """A CPU tensor's ``type()`` reported as the ``torch.cuda.*`` name."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(out, str)
                and out.startswith("torch.") and not out.startswith("torch.cuda.")):
            return "torch.cuda." + out[len("torch."):]
        return out


_MODES: List[TorchFunctionMode] = []   # the process-wide modes entered by the patches, in order


def enter_mode(mode: TorchFunctionMode) -> Callable[[], None]:
    """Enter ``mode`` process-wide and remember it; returns how to leave it."""
    mode.__enter__()
    _MODES.append(mode)

    def undo():
        """Leave the mode and forget it."""
        _MODES.remove(mode)
        mode.__exit__(None, None, None)
    return undo


@contextlib.contextmanager
def cpu_modes_suspended():
    """Runs its body without the function modes ``cpu_patches`` entered: only megatron-core hard-codes CUDA, and
    every torch call under a Python function mode pays ~4 us (about 14,000 calls a step in vLLM
    generation, batch building, weight sync and rewards). A no-op with CUDA (no modes) or when
    another mode sits above ours (correct, only slower); usable as a decorator."""
    from torch.overrides import _get_current_function_mode_stack

    active = list(_MODES)
    ours_on_top = bool(active) and _get_current_function_mode_stack()[-len(active):] == active
    if ours_on_top:
        for mode in reversed(active):
            mode.__exit__(None, None, None)
    try:
        yield
    finally:
        if ours_on_top:
            for mode in active:
                mode.__enter__()


@contextlib.contextmanager
def cpu_modes_resumed():
    """The function modes back for Megatron code called from inside ``cpu_modes_suspended``
    (the reward model scores responses in the middle of a rollout); a no-op where they are on
    or were never entered."""
    from torch.overrides import _get_current_function_mode_stack

    active = list(_MODES)
    off = bool(active) and not any(m in _get_current_function_mode_stack() for m in active)
    if off:
        for mode in active:
            mode.__enter__()
    try:
        yield
    finally:
        if off:
            for mode in reversed(active):
                mode.__exit__(None, None, None)
