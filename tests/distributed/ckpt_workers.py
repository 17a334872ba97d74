"""Resume exactness and checkpoint hygiene with megatron-core dist checkpoints (gloo, CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_rl.checkpoint.dist_ckpt import load_checkpoint, read_latest, save_checkpoint
from megatron_rl.model.build import ModelOptions
from megatron_rl.parallel.config import Layout
from megatron_rl.model.hf_config import load_hf_config
from megatron_rl.model.tiny import tiny_hf_config
from megatron_rl.parallel.loss import step_denominators
from megatron_rl.train.megatron_loss import PolicyLoss, train_forward_backward
from megatron_rl.runtime.model_setup import build_model, unwrap
from megatron_rl.train.optimizer import OptimSettings, build_optimizer, nonfinite_flag, optimizer_step
from megatron_rl.runtime.parallel_init import destroy_megatron_parallel, init_megatron_parallel
from tests.distributed import model_workers as mw

SETTINGS = OptimSettings(lr=1e-2, warmup_steps=2, total_steps=6, decay_style="cosine", weight_decay=0.01)


def _setup(layout, seed):
    hf = load_hf_config(tiny_hf_config("qwen3_moe"))
    groups = init_megatron_parallel(layout, seed)
    model, _ = build_model(hf, layout, ModelOptions(), distributed_optimizer=True)
    opt, sched = build_optimizer(model, SETTINGS, torch.float32)
    return hf, groups, model, opt, sched


def _train(model, opt, sched, groups, steps, start):
    losses = []
    for step in range(start, start + steps):
        data = mw._sequences(256, seed=step)  # the step's rollout batch
        adv = mw._advantages(data, "grpo", {})
        for m in model:
            m.zero_grad_buffer()
        opt.zero_grad()
        mine = [b for b in range(mw.NSEQ) if b % groups.dp_size == groups.dp_rank]
        mbs = mw._built_micro_batches(data, adv, [mine[::2], mine[1::2]], groups, packed=False)
        nt, ns = step_denominators([m.shard for m in mbs], groups.dp_cp)
        out = train_forward_backward(model, mbs, PolicyLoss("gspo", {"eps_low": 0.2, "eps_high": 0.2}, nt, ns),
                                     groups)
        applied, _, _ = optimizer_step(opt, sched, nonfinite_flag(model, []), torch.distributed.group.WORLD)
        assert applied
        losses.append(sum(float(o["loss"]) for o in out))
    return losses


def resume(rank: int, world: int, tmp: str, layout_kw) -> dict:
    layout = Layout(**layout_kw)
    root = Path(tmp) / "ckpt"
    _, groups, model, opt, sched = _setup(layout, seed=1)
    first = _train(model, opt, sched, groups, 3, 0)
    save_checkpoint(root, 3, unwrap(model[0]), opt, sched, {"consumed": 3})
    straight = _train(model, opt, sched, groups, 3, 3)
    want = [p.detach().clone() for p in unwrap(model[0]).parameters()]
    destroy_megatron_parallel()

    _, groups, model, opt, sched = _setup(layout, seed=99)  # other weights until the load
    state = load_checkpoint(root / "step_00000003", unwrap(model[0]), opt, sched)
    resumed = _train(model, opt, sched, groups, 3, 3)
    got = [p.detach() for p in unwrap(model[0]).parameters()]
    identical = torch.tensor([float(all(torch.equal(a, b) for a, b in zip(want, got)))])
    torch.distributed.all_reduce(identical, op=torch.distributed.ReduceOp.MIN)   # every rank's shard
    destroy_megatron_parallel()
    return {"identical_weights": bool(identical), "straight": straight, "resumed": resumed,
            "first": first, "trainer_state": state, "latest": read_latest(root)[0]}


def hygiene(rank: int, world: int, tmp: str) -> dict:
    root = Path(tmp) / "ckpt"
    _, groups, model, opt, sched = _setup(Layout(), seed=1)
    for step in (1, 2, 3):
        _train(model, opt, sched, groups, 1, step)
        save_checkpoint(root, step, unwrap(model[0]), opt, sched, {"step": step}, keep_last=2)
    kept = sorted(p.name for p in root.glob("step_*"))
    # a save that died half-way: its temp dir must be ignored, "latest" must still be step 3
    if rank == 0:
        (root / ".tmp-step_00000004").mkdir()
        (root / ".tmp-step_00000004" / "half_written").write_text("x")
    torch.distributed.barrier()
    latest = read_latest(root)[0]
    _, groups2, model2, opt2, sched2 = (None,) * 5
    destroy_megatron_parallel()
    _, groups2, model2, opt2, sched2 = _setup(Layout(), seed=5)
    state = load_checkpoint(root / f"step_{latest:08d}", unwrap(model2[0]), opt2, sched2)
    try:
        load_checkpoint(root / ".tmp-step_00000004", unwrap(model2[0]), opt2, sched2)
        partial_error = ""
    except ValueError as e:
        partial_error = str(e)
    destroy_megatron_parallel()
    return {"kept": kept, "latest": latest, "state": state, "partial_error": partial_error,
            "tmp_left": os.path.isdir(root / ".tmp-step_00000004")}


def _saved(root: Path, steps):
    """A model trained one step before each of ``steps`` and saved there (keep 2), and
    ``attempt(name, fallback)``: resume from ``root``, recording the step or the error in ``out``."""
    from types import SimpleNamespace

    from megatron_rl.checkpoint.manifest import CheckpointError
    from megatron_rl.train.setup import resume_checkpoint

    _, groups, model, opt, sched = _setup(Layout(), seed=1)
    for step in steps:
        _train(model, opt, sched, groups, 1, step)
        save_checkpoint(root, step, unwrap(model[0]), opt, sched, {"step": step}, keep_last=2)
    ms = SimpleNamespace(model=model, optimizer=opt, scheduler=sched)
    out = {}

    def attempt(name, fallback=False):
        try:
            state, warned = resume_checkpoint(root, ms, fallback)
            out[name] = {"step": state["step"] if state else None, "warned": warned}
        except CheckpointError as e:
            out[name] = {"error": str(e)}

    return model, opt, sched, out, attempt


def integrity(rank: int, world: int, tmp: str) -> dict:
    """Damaged checkpoints are named at load; fallback only when allowed."""
    from megatron_rl.checkpoint.manifest import CheckpointError

    root = Path(tmp) / "ckpt"
    model, opt, sched, out, attempt = _saved(root, (1, 2))
    attempt("clean")
    shard = sorted((root / "step_00000002").glob("*.distcp"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    out["shard"] = shard.name
    attempt("truncated")
    attempt("truncated_fallback", fallback=True)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(flipped))
    attempt("altered")
    shard.write_bytes(data)
    (root / "step_00000002" / "manifest.json").write_text("{not json")
    attempt("bad_manifest")
    (root / "step_00000002" / "manifest.json").unlink()
    attempt("no_manifest")
    (root / "step_00000001" / "trainer_state.json").write_text("{}")
    attempt("none_left", fallback=True)
    # a forger rewrites .metadata to run code at load, and the manifest to match
    import pickle

    from megatron_rl.checkpoint import manifest as M
    from megatron_rl.checkpoint.dist_ckpt import load_checkpoint as load
    from tests.unit.test_safe_load import _Payload

    forged, marker = root / "step_00000001", Path(tmp) / "pwned"
    (forged / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    M.write_manifest(forged, M.digests(forged, M.checkpoint_files(forged)))
    try:
        load(forged, unwrap(model[0]), opt, sched)
        out["forged"] = {"error": ""}
    except CheckpointError as e:
        out["forged"] = {"error": str(e), "ran": marker.exists()}
    destroy_megatron_parallel()
    return out


def latest_damage(rank: int, world: int, tmp: str) -> dict:
    """Resume scans the step directories and only compares ``latest``; a save never deletes a
    checkpoint newer than itself; a checkpoint mixing two runs is refused."""
    import json

    from megatron_rl.checkpoint import manifest as M

    root = Path(tmp) / "ckpt"
    model, opt, sched, out, attempt = _saved(root, (25, 30))
    latest = root / "latest"
    latest.unlink()
    attempt("deleted")
    attempt("deleted_fallback", fallback=True)
    for name, text in (("cut", "3"), ("empty", ""), ("garbled", "banana")):
        latest.write_text(text)
        attempt(name)
        attempt(f"{name}_fallback", fallback=True)
    latest.write_text("30")
    # a run saving an early step (it started over) deletes nothing newer than that step
    save_checkpoint(root, 1, unwrap(model[0]), opt, sched, {"step": 1}, keep_last=2)
    out["after_early_save"] = sorted(p.name for p in root.glob("step_*"))
    out["latest_after_early_save"] = latest.read_text()
    # trainer_state.json of another run under a manifest rewritten to match its bytes
    d = root / "step_00000030"
    state = json.loads((d / "trainer_state.json").read_text())
    sealed_by = json.loads((d / "manifest.json").read_text())["run_id"]
    (d / "trainer_state.json").write_text(json.dumps({**state, "run_id": "another-run"}))
    M.write_manifest(d, M.digests(d, M.checkpoint_files(d)), sealed_by)
    attempt("mixed")
    out["run_ids"] = [sealed_by, state["run_id"]]
    for p in root.glob("step_*"):
        p.rename(root / f"moved-{p.name}")
    attempt("no_directories_left", fallback=True)
    destroy_megatron_parallel()
    return out


def _optimizer_state(opt):
    out = []
    for o in getattr(opt, "chained_optimizers", [opt]):
        for group in o.optimizer.param_groups:
            for p in group["params"]:
                out.append(p.detach().clone())
                out += [v.detach().clone() for v in o.optimizer.state[p].values()
                        if isinstance(v, torch.Tensor)]
    return out


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def nonfinite_updates(rank: int, world: int, tmp: str) -> dict:
    """A NaN in one rank's loss, or an Inf in one rank's gradient, skips the update on every rank
    and leaves weights, Adam state and the LR schedule untouched; the next clean step applies."""
    from megatron_rl.train.optimizer import nonfinite_flag

    _, groups, model, opt, sched = _setup(Layout(), seed=1)
    _train(model, opt, sched, groups, 1, 0)   # Adam state exists from here on
    results = {}
    for case in ("nan_loss_on_rank1", "inf_grad_on_rank1"):
        weights = [p.detach().clone() for p in unwrap(model[0]).parameters()]
        state, lr_steps = _optimizer_state(opt), sched.num_steps
        data = mw._sequences(256, seed=7)
        adv = mw._advantages(data, "grpo", {})
        if case == "nan_loss_on_rank1" and rank == 1:
            adv = torch.full_like(adv, float("nan"))   # e.g. a reward function returned NaN
        for m in model:
            m.zero_grad_buffer()
        mine = [b for b in range(mw.NSEQ) if b % groups.dp_size == groups.dp_rank]
        mbs = mw._built_micro_batches(data, adv, [mine[::2], mine[1::2]], groups, packed=False)
        nt, ns = step_denominators([m.shard for m in mbs], groups.dp_cp)
        out = train_forward_backward(model, mbs, PolicyLoss("gspo", {}, nt, ns), groups)
        if case == "inf_grad_on_rank1" and rank == 1:  # after the DP reduce: rank 1 alone sees it
            model[0].buffers[0].grad_data[3] = float("inf")
        flag = nonfinite_flag(model, [o["loss"] for o in out])
        applied, _, _ = optimizer_step(opt, sched, flag, torch.distributed.group.WORLD)
        results[case] = {
            "local_flag": float(flag), "applied": bool(applied),
            "weights_untouched": all(torch.equal(a, b) for a, b in
                                     zip(weights, unwrap(model[0]).parameters())),
            "optimizer_untouched": _same(state, _optimizer_state(opt)),
            "schedule_untouched": sched.num_steps == lr_steps}
    before = [p.detach().clone() for p in unwrap(model[0]).parameters()]
    _train(model, opt, sched, groups, 1, 8)
    results["clean_step_moves_weights"] = not all(
        torch.equal(a, b) for a, b in zip(before, unwrap(model[0]).parameters()))
    destroy_megatron_parallel()
    return results


def _built(name, **overrides):
    hf = load_hf_config(tiny_hf_config(name, **overrides))
    init_megatron_parallel(Layout(), 1)
    model, _ = build_model(hf, Layout(), ModelOptions(), distributed_optimizer=True)
    return model


def checkpoint_dir_fuzz(rank: int, world: int, tmp: str) -> dict:
    """``model.init_from`` given everything but the right checkpoint: each load is refused with
    one line naming the directory (or file) and what is wrong; the model is never half-loaded
    into a run that then continues."""
    import shutil

    from megatron_rl.checkpoint.dist_ckpt import load_model, save_model

    base = Path(tmp)
    good = base / "good"
    save_model(good, _built("qwen3_moe")[0], {"source": "test"})
    destroy_megatron_parallel()
    dirs = {"missing": base / "nope", "empty dir": base / "empty", "a file": base / "file.bin",
            "random files": base / "random", "hf model dir": base / "hf"}
    dirs["empty dir"].mkdir()
    dirs["a file"].write_bytes(b"\0" * 64)
    dirs["random files"].mkdir()
    (dirs["random files"] / "weights.distcp").write_bytes(os.urandom(256))
    from megatron_rl.model.tiny import write_tiny_hf_model

    write_tiny_hf_model("qwen3_moe", dirs["hf model dir"])
    for name, drop in (("no manifest", "manifest.json"), ("no metadata", "metadata.json"),
                       ("no .metadata", ".metadata")):
        d = base / name.replace(" ", "_")
        shutil.copytree(good, d)
        (d / drop).unlink()
        dirs[name] = d
    trunc = base / "truncated"
    shutil.copytree(good, trunc)
    shard = sorted(trunc.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    dirs["truncated shard"] = trunc
    out = {}
    targets = {"same model": {}, "wider model": {"hidden_size": 96},
               "more experts": {"num_experts": 8}, "other architecture": None}
    for target, overrides in targets.items():
        model = _built("mixtral") if overrides is None else _built("qwen3_moe", **overrides)
        cases = dirs if target == "same model" else {"good": good}
        for name, d in cases.items():
            try:
                load_model(d, model[0])
                out[f"{target} <- {name}"] = "loaded"
            except ValueError as e:
                out[f"{target} <- {name}"] = str(e)
        destroy_megatron_parallel()
    return out


def _global_losses(losses, groups):
    """Each step's whole loss: the partial losses of the last stage's TP-rank-0 ranks, summed."""
    from megatron.core import parallel_state as ps

    mine = ps.is_pipeline_last_stage() and groups.tp_rank == 0
    t = torch.tensor([x if mine else 0.0 for x in losses], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def reshard(rank: int, world: int, tmp: str, cases) -> dict:
    """``cases``: (name, saving layout, loading layout, optimizer format). Train 3 steps, save,
    train 2 more; then build the other layout, load, train the same 2: the whole-step losses
    (and so the optimizer state: Adam moments, step, LR schedule) must carry over, or the load
    must be refused in one line."""
    from megatron_rl.checkpoint.manifest import CheckpointError

    from megatron_rl.checkpoint.dist_ckpt import load_model

    out = {}
    for name, src, dst, fmt in cases:
        root = Path(tmp) / name
        src, dst = Layout(**src), Layout(**dst)
        _, groups, model, opt, sched = _setup(src, seed=1)
        _train(model, opt, sched, groups, 3, 0)
        save_checkpoint(root, 3, unwrap(model[0]), opt, sched, {}, optimizer_format=fmt,
                        layout=src.sizes(world))
        straight = _global_losses(_train(model, opt, sched, groups, 2, 3), groups)
        destroy_megatron_parallel()
        _, groups, model, opt, sched = _setup(dst, seed=99)
        try:
            if name.endswith("weights_only"):     # the mutant: a fresh optimizer on the weights
                load_model(root / "step_00000003", unwrap(model[0]))
                opt.reload_model_params()
            else:
                load_checkpoint(root / "step_00000003", unwrap(model[0]), opt, sched,
                                layout=dst.sizes(world))
            resumed, error = _global_losses(_train(model, opt, sched, groups, 2, 3), groups), ""
        except CheckpointError as e:
            resumed, error = [], str(e)
        destroy_megatron_parallel()
        out[name] = {"straight": straight, "resumed": resumed, "error": error}
    return out


def dp_world_save(rank: int, world: int, tmp: str, fmt: str) -> list:
    """World 2 (DP 2): 3 steps, save, 2 more; the whole-step losses of the last 2."""
    _, groups, model, opt, sched = _setup(Layout(), seed=1)
    _train(model, opt, sched, groups, 3, 0)
    save_checkpoint(Path(tmp), 3, unwrap(model[0]), opt, sched, {}, optimizer_format=fmt,
                    layout=Layout().sizes(world))
    out = _global_losses(_train(model, opt, sched, groups, 2, 3), groups)
    destroy_megatron_parallel()
    return out


def dp_world_load(rank: int, world: int, tmp: str) -> list:
    """Another world size (DP 1): load the checkpoint and take the same 2 steps."""
    _, groups, model, opt, sched = _setup(Layout(), seed=9)
    load_checkpoint(Path(tmp) / "step_00000003", unwrap(model[0]), opt, sched,
                    layout=Layout().sizes(world))
    out = _global_losses(_train(model, opt, sched, groups, 2, 3), groups)
    destroy_megatron_parallel()
    return out
