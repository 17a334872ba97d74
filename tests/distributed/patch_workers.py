"""Is each CPU patch still needed? Run one training step with every patch but that one and
record what upstream raises (the patch's docstring names the error it must still be)."""

from __future__ import annotations

import traceback

import torch

from megatron_rl.model.build import ModelOptions
from megatron_rl.parallel.config import Layout
from megatron_rl.model.cpu_patches import apply_cpu_patches, revert_cpu_patches
from megatron_rl.model.hf_config import load_hf_config
from megatron_rl.model.tiny import tiny_hf_config
from megatron_rl.parallel.loss import step_denominators
from megatron_rl.train.megatron_loss import PolicyLoss, train_forward_backward
from megatron_rl.runtime.model_setup import build_model
from megatron_rl.train.optimizer import OptimSettings, build_optimizer, nonfinite_flag, optimizer_step
from megatron_rl.runtime.parallel_init import init_megatron_parallel
from tests.distributed import model_workers as mw

# which layout needs which patch (world size = product of the sizes)
NEEDS = {
    1: {"rng": {}, "curdev": {}, "tegemm": {}, "stream": {}, "devmode": {}, "typestr": {},
        "telinear": {"model": "deepseek_v3"}},
    2: {"spnorm": {"tp": 2}, "a2a_splits": {"ep": 2}, "sync": {"pp": 2}},
    4: {"uneven": {"tp": 2, "ep": 2}},
}


def _one_step(layout: Layout, model_name: str) -> None:
    hf = load_hf_config(tiny_hf_config(model_name))
    groups = init_megatron_parallel(layout, seed=3, cpu_patches=False)
    model, _ = build_model(hf, layout, ModelOptions(token_dispatcher="alltoall"),
                           distributed_optimizer=True)
    opt, sched = build_optimizer(model, OptimSettings(lr=1e-3), torch.float32)
    data = mw._sequences(hf.vocab_size)
    adv = mw._advantages(data, "grpo", {})
    mine = [b for b in range(mw.NSEQ) if b % groups.dp_size == groups.dp_rank]
    mbs = mw._micro_batches(data, adv, [mine[::2], mine[1::2]], groups.cp)
    nt, ns = step_denominators([m.shard for m in mbs], groups.dp_cp)
    train_forward_backward(model, mbs, PolicyLoss("gspo", {}, nt, ns), groups)
    optimizer_step(opt, sched, nonfinite_flag(model, []), torch.distributed.group.WORLD)


def _cleanup() -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    revert_cpu_patches()
    ps.destroy_model_parallel()
    get_cuda_rng_tracker().reset()


def _attempt(layout: Layout, skip, model_name: str) -> str:
    """'' if the step ran; otherwise the error, type and message."""
    try:
        apply_cpu_patches(skip=skip)
        _one_step(layout, model_name)
        return ""
    except Exception as e:  # noqa: BLE001 -- the error is the result
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "megatron/core" in f.filename]
        where = f"{frames[-1].filename.split('megatron/core/')[-1]}:{frames[-1].name}" if frames else "?"
        return f"{type(e).__name__}: {e} @ {where}"
    finally:
        _cleanup()


def still_needed(rank: int, world: int) -> dict:
    out = {}
    for name, kw in NEEDS[world].items():
        kw = dict(kw)
        model_name = kw.pop("model", "qwen3_moe")
        layout = Layout(**kw)
        out[f"all:{name}"] = _attempt(layout, (), model_name)     # with every patch it runs
        out[name] = _attempt(layout, (name,), model_name)
    return out
