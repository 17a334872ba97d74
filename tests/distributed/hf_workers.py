"""HF <-> megatron-core conversion under gloo: round trips, layouts and bad inputs.

Each layout case checks import and export separately, so that an error in one direction cannot be
hidden by the same error in the other: the checkpoint imported *at the layout* is exported at the
plain layout (its content must be right), and the checkpoint imported at the plain layout is
exported *at the layout* (the export must be right); both must give the original files' tensors.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict

from megatron_rl.checkpoint.convert import export_hf, import_hf, verify
from megatron_rl.parallel.config import Layout


def file_hashes(directory: str) -> Dict[str, str]:
    """sha256 of every weight file and the index (the bytes users get)."""
    out = {}
    for f in sorted(glob.glob(os.path.join(directory, "*.safetensors")) +
                    glob.glob(os.path.join(directory, "*.index.json"))):
        out[os.path.basename(f)] = hashlib.sha256(Path(f).read_bytes()).hexdigest()
    return out


def round_trips(rank: int, world: int, tmp: str, models: Dict[str, str]) -> dict:
    """World of one: import, logits against transformers, export."""
    out = {}
    for name, hf_dir in models.items():
        ck, ex = os.path.join(tmp, name, "mc"), os.path.join(tmp, name, "hf_out")
        rep = import_hf(hf_dir, ck)
        out[name] = {"imported": rep.tensors, "verify": verify(hf_dir, ck),
                     "exported": export_hf(ck, ex).tensors, "out_dir": ex}
        # bf16: the import's check runs on the same mapping at fp32, after saving
        bf16 = import_hf(hf_dir, os.path.join(tmp, name, "mc_bf16"), dtype="bf16", tolerance=1e-4)
        out[name]["bf16_check"] = {"notes": bf16.notes, **bf16.verified}
    return out


def layouts(rank: int, world: int, tmp: str, models: Dict[str, str], cases) -> dict:
    """``cases``: ``[(case name, model name, layout kwargs)]``."""
    out, base = {}, {}
    for case, model, kw in cases:
        hf_dir, layout = models[model], Layout(**kw)
        root = os.path.join(tmp, case)
        if model not in base:  # the plain layout (data parallel only): the reference
            base[model] = os.path.join(tmp, f"base_{model}")
            import_hf(hf_dir, base[model])
            export_hf(base[model], base[model] + "_hf")
        import_hf(hf_dir, root + "_mc", layout)
        export_hf(root + "_mc", root + "_from_layout_import", Layout())
        export_hf(base[model], root + "_from_layout_export", layout)
        r = {"reference": file_hashes(base[model] + "_hf"),
             "import_at_layout": file_hashes(root + "_from_layout_import"),
             "export_at_layout": file_hashes(root + "_from_layout_export"),
             "out_dir": root + "_from_layout_export"}
        if layout.pp == 1:
            r["verify"] = verify(hf_dir, root + "_mc", layout)
        out[case] = r
    return out


def _error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "NO ERROR"


def _copy_without(src: str, dst: str, drop: str) -> str:
    """A copy of an HF dir whose safetensors file lacks the tensor ``drop``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    del tensors[drop]
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def _with_config(src: str, dst: str, **changes) -> str:
    shutil.copytree(src, dst)
    p = os.path.join(dst, "config.json")
    cfg = json.loads(Path(p).read_text())
    cfg.update(changes)
    Path(p).write_text(json.dumps(cfg))
    return dst


def _two_shards_wrong_index(src: str, dst: str) -> str:
    """Two shard files and an index that points one tensor at the shard that lacks it."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, "model.safetensors"))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for f, part in halves.items():
        save_file({n: tensors[n] for n in part}, os.path.join(dst, f))
        weight_map.update({n: f for n in part})
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    Path(dst, "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


def _truncated(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    p = Path(dst, "model.safetensors")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 4096])
    return dst


def _import_with_wrong_reference(hf_dir: str, out: str):
    """The import's own check against transformers, with transformers' logits shifted: the
    import must fail and keep nothing."""
    from megatron_rl.checkpoint import convert

    real = convert._hf_logits
    convert._hf_logits = lambda *args: real(*args) + 0.01
    try:
        return import_hf(hf_dir, out)
    finally:
        convert._hf_logits = real


def bad_inputs(rank: int, world: int, tmp: str, models: Dict[str, str]) -> dict:
    """Each broken input's error message, and whether any output appeared."""
    moe, t = models["qwen3_moe"], Path(tmp)
    good_ckpt = str(t / "good")
    import_hf(moe, good_ckpt)
    no_hf = str(t / "no_hf")
    shutil.copytree(good_ckpt, no_hf)
    shutil.rmtree(os.path.join(no_hf, "hf"))
    bin_only = t / "bin_only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text(Path(moe, "config.json").read_text())
    (bin_only / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    cases = {
        "index_wrong_shard": lambda o: import_hf(_two_shards_wrong_index(moe, str(t / "idx")), o),
        "truncated_shard": lambda o: import_hf(_truncated(moe, str(t / "trunc")), o),
        "unknown_config_key": lambda o: import_hf(_with_config(moe, str(t / "unk"), foo=1), o),
        "transformers_rejects": lambda o: import_hf(_with_config(
            moe, str(t / "rej"), num_attention_heads="x"), o),
        "verify_mismatch": lambda o: _import_with_wrong_reference(moe, o),
        "missing_expert": lambda o: import_hf(_copy_without(
            moe, str(t / "missing"), "model.layers.1.mlp.experts.3.up_proj.weight"), o),
        "shape_mismatch": lambda o: import_hf(_with_config(moe, str(t / "shape"), moe_intermediate_size=32), o),
        "config_disagrees": lambda o: import_hf(_with_config(moe, str(t / "layers"), num_hidden_layers=1), o),
        "unknown_architecture": lambda o: import_hf(_with_config(
            moe, str(t / "arch"), architectures=["GPT2LMHeadModel"]), o),
        "pickle_only": lambda o: import_hf(str(bin_only), o),
        "not_a_directory": lambda o: import_hf(str(t / "nowhere"), o),
        "output_not_empty": lambda o: import_hf(moe, good_ckpt),
        "export_needs_config": lambda o: export_hf(no_hf, o),
        "export_wrong_model": lambda o: export_hf(good_ckpt, o, hf_config=models["mixtral"]),
        "export_not_a_checkpoint": lambda o: export_hf(moe, o, hf_config=moe),
    }
    out = {}
    for name, fn in cases.items():
        o = str(t / f"out_{name}")
        msg = _error(lambda: fn(o))
        out[name] = {"message": msg, "output_exists": os.path.exists(o),
                     "partial_left": bool(glob.glob(str(t / f".out_{name}*")))}
    return out


def vllm_agreement(rank: int, world: int, tmp: str, models: Dict[str, str]) -> dict:
    """Each exported directory served by vLLM (CPU build, fp32): the per-token log-probs of what
    it samples, against the Megatron forward of the imported checkpoint on the same tokens."""
    import torch

    from megatron_rl.checkpoint.dist_ckpt import load_model
    from megatron_rl.checkpoint.convert import _build
    from megatron_rl.model.hf_config import load_hf_config
    from megatron_rl.rollout.engine import EngineSettings, RolloutEngine
    from megatron_rl.runtime.parallel_init import destroy_megatron_parallel
    from tests.distributed.rollout_workers import _megatron_logprobs, _mismatch

    out = {}
    for name, hf_dir in models.items():
        ck, ex = os.path.join(tmp, name, "mc"), os.path.join(tmp, name, "hf_out")
        import_hf(hf_dir, ck)
        export_hf(ck, ex)
        engine = RolloutEngine(EngineSettings(ex, dtype="float32", max_model_len=128, seed=1))
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (5, 9, 12)]
        samples = [s for group in engine.generate(prompts, n=2, max_tokens=16) for s in group]
        model, groups = _build(load_hf_config(ex), Layout(), torch.float32)
        load_model(ck, model)
        worst = _mismatch(samples, _megatron_logprobs(model, samples, groups.tp))
        destroy_megatron_parallel()
        engine.shutdown()
        out[name] = {"max_abs_diff": worst, "tokens": sum(len(s.token_ids) for s in samples)}
    return out


def training_checkpoint_export(rank: int, world: int, tmp: str, hf_dir: str) -> dict:
    """A trainer's checkpoint (DDP model + distributed optimizer, ``save_checkpoint``) exports
    with ``--hf-config`` like a converted one."""
    import torch

    from megatron_rl.checkpoint.dist_ckpt import load_model, save_checkpoint
    from megatron_rl.model.build import ModelOptions
    from megatron_rl.model.hf_config import load_hf_config
    from megatron_rl.runtime.model_setup import build_model
    from megatron_rl.train.optimizer import OptimSettings, build_optimizer
    from megatron_rl.runtime.parallel_init import destroy_megatron_parallel, init_megatron_parallel

    import_hf(hf_dir, os.path.join(tmp, "mc"))
    hf = load_hf_config(hf_dir)
    init_megatron_parallel(Layout(), 0)
    model, _ = build_model(hf, Layout(), ModelOptions(), distributed_optimizer=True)
    load_model(os.path.join(tmp, "mc"), model[0])
    opt, sched = build_optimizer(model, OptimSettings(lr=1e-3), torch.float32)
    step_dir = save_checkpoint(os.path.join(tmp, "train"), 0, model[0], opt, sched, {})
    destroy_megatron_parallel()
    out = os.path.join(tmp, "out")
    export_hf(step_dir, out, hf_config=hf_dir, tokenizer=hf_dir)
    return {"out_dir": out}
