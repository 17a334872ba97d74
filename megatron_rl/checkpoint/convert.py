"""``megatron-rl convert``: Hugging Face safetensors <-> megatron-core distributed checkpoints.

Run as one process or under ``torchrun`` with any TP / PP / EP layout (``--tp/--pp/--ep/--etp``;
the rest of the world is data parallel, whose replicas share the work). Import fills each rank's
shard from the HF files and saves a model-only distributed checkpoint (any layout loads it);
export loads one (or a training checkpoint) and streams the HF tensors to rank 0, which writes
sharded safetensors. Outputs appear under their final name only when complete. Every check that
can fail runs on every rank, so a bad input is one clear error everywhere, never a hang.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, TypeVar

import torch

from megatron_rl.checkpoint.dist_ckpt import _rank, load_model, model_info, save_model
from megatron_rl.checkpoint.hf_io import SIDE_FILES, HFReader, HFWriter, copy_side_files
from megatron_rl.checkpoint.hf_mapping import IGNORED_HF, mapping_for
from megatron_rl.checkpoint.hf_weights import iter_hf_weights, load_hf_weights
from megatron_rl.model.build import ModelOptions
from megatron_rl.model.hf_config import HFModel, load_hf_config
from megatron_rl.parallel.config import Layout
from megatron_rl.parallel.launch import init_distributed
from megatron_rl.parallel.weight_comm import all_gather_objects

T = TypeVar("T")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass
class Report:
    tensors: int
    bytes: int
    seconds: float
    notes: str = ""

    def line(self, what: str) -> str:
        gb = self.bytes / 1e9
        rate = gb / self.seconds if self.seconds > 0 else float("inf")
        return (f"{what}: {self.tensors} tensors, {gb:.3f} GB in {self.seconds:.2f} s "
                f"({rate:.2f} GB/s){self.notes}")


def _everywhere(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raised ``ValueError`` on any, raise the first message on all."""
    err, out = None, None
    try:
        out = fn()
    except ValueError as e:
        err = str(e)
    errors = [e for e in all_gather_objects(err) if e]
    if errors:
        raise ValueError(errors[0])
    return out


def _dtype(name: str, hf_cfg: Dict) -> torch.dtype:
    if name == "auto":
        declared = str(hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32")
        return DTYPES.get(declared, torch.float32)
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: choose one of auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def _require_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not empty; choose a new output directory "
                         "(nothing was written)")


def _build(hf: HFModel, layout: Layout, dtype: torch.dtype):
    from megatron_rl.train.model_setup import build_model
    from megatron_rl.train.parallel_init import init_megatron_parallel, weight_groups

    init_megatron_parallel(layout, seed=0)
    [model], _ = build_model(hf, layout, ModelOptions(params_dtype=dtype, init_weights=False), ddp=False)
    return model, weight_groups()


def _mtp_layer(name: str, hf_cfg: Dict) -> bool:
    """DeepSeek-V3 checkpoints carry ``num_nextn_predict_layers`` multi-token-prediction layers
    after the last decoder layer; RL training does not use them (any other extra layer is an
    error: the config disagrees with the weights)."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    n = int(hf_cfg.get("num_hidden_layers", 0))
    return bool(m) and n <= int(m[1]) < n + int(hf_cfg.get("num_nextn_predict_layers") or 0)


def import_hf(hf_dir: os.PathLike, out: os.PathLike, layout: Layout = Layout(),
              dtype: str = "auto") -> Report:
    """HF directory -> model-only distributed checkpoint at ``out`` (collective)."""
    from megatron_rl.train.parallel_init import destroy_megatron_parallel

    init_distributed()
    out = Path(out)
    reader = _everywhere(lambda: HFReader(hf_dir))
    hf_cfg = reader.config()
    hf = _everywhere(lambda: load_hf_config(hf_cfg))
    mapping = _everywhere(lambda: mapping_for(hf))
    params_dtype = _everywhere(lambda: _dtype(dtype, hf_cfg))
    _everywhere(lambda: _require_empty(out))
    t0 = time.perf_counter()
    model, groups = _build(hf, layout, params_dtype)
    try:
        read = _everywhere(lambda: load_hf_weights(model, reader, mapping, groups, hf.num_experts))
        used = set().union(*[set(r) for r in all_gather_objects(sorted(read))])
        skipped = [n for n in reader.names() if n not in used and _mtp_layer(n, hf_cfg)]
        unused = [n for n in reader.names() if n not in used and n not in skipped
                  and not any(p.match(n) for p in IGNORED_HF)]
        if unused:
            raise ValueError(f"{hf_dir}: {len(unused)} tensor(s) the model built from config.json "
                             f"does not use, e.g. {', '.join(unused[:3])}: config.json disagrees "
                             "with the weights (nothing was written)")
        info = {"format": "megatron_rl.model/1", "architecture": hf.architecture,
                "dtype": str(params_dtype).replace("torch.", ""), "source": str(Path(hf_dir).resolve()),
                "hf_tensors": len(used)}
        save_model(out, model, info, hf_files=hf_dir)
        nbytes = sum(reader.shape_bytes(n) for n in used)
    finally:
        destroy_megatron_parallel()
    note = f"; skipped {len(skipped)} multi-token-prediction tensors" if skipped else ""
    return Report(len(used), nbytes, time.perf_counter() - t0, note)


def _hf_config_for(ckpt: Path, hf_config: Optional[os.PathLike]) -> Path:
    if hf_config is not None:
        p = Path(hf_config)
        return p / "config.json" if p.is_dir() else p
    p = ckpt / "hf" / "config.json"
    if not p.is_file():
        raise ValueError(f"{ckpt}: has no hf/config.json (a training checkpoint?); pass "
                         "--hf-config with the model's config.json or HF directory")
    return p


def export_hf(ckpt: os.PathLike, out: os.PathLike, layout: Layout = Layout(),
              hf_config: Optional[os.PathLike] = None, tokenizer: Optional[os.PathLike] = None,
              dtype: Optional[str] = None, shard_bytes: int = 4 << 30) -> Report:
    """Distributed checkpoint -> HF directory at ``out`` (collective; rank 0 writes)."""
    from megatron_rl.train.parallel_init import destroy_megatron_parallel

    init_distributed()
    ckpt, out = Path(ckpt), Path(out)
    cfg_path = _everywhere(lambda: _hf_config_for(ckpt, hf_config))
    hf_cfg = json.loads(cfg_path.read_text())
    hf = _everywhere(lambda: load_hf_config(cfg_path))
    mapping = _everywhere(lambda: mapping_for(hf))
    _everywhere(lambda: _require_empty(out))
    info = model_info(ckpt) or {}
    params_dtype = DTYPES[info.get("dtype", "float32")]
    out_dtype = _everywhere(lambda: _dtype(dtype, hf_cfg) if dtype else params_dtype)
    t0 = time.perf_counter()
    model, groups = _build(hf, layout, params_dtype)
    try:
        _everywhere(lambda: load_model(ckpt, model))
        side = tokenizer or (ckpt / "hf" if (ckpt / "hf").is_dir() else None)
        count, nbytes = write_hf_model(model, hf, mapping, groups, hf_cfg, out, out_dtype, side,
                                       shard_bytes)
    finally:
        destroy_megatron_parallel()
    return Report(count, nbytes, time.perf_counter() - t0)


def write_hf_model(model, hf: HFModel, mapping, groups, hf_cfg: Dict, out: Path,
                   dtype: torch.dtype, side_files: Optional[os.PathLike] = None,
                   shard_bytes: int = 4 << 30):
    """The weights of ``model`` (any layout, collective) as an HF directory at ``out``, written
    by rank 0 to ``.<name>.partial`` and renamed when complete; ``config.json`` from ``hf_cfg``,
    tokenizer and generation files copied from ``side_files``. Returns ``(tensors, bytes)``."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    writer = None
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        writer = HFWriter(tmp, shard_bytes)
    from megatron_rl.train.model_setup import unwrap

    for name, t in iter_hf_weights(unwrap(model), mapping, groups, hf.num_experts, dst=0):
        writer.add(name, t.to(dtype))
    if writer is not None:
        writer.close()
        _write_config(tmp, hf_cfg, dtype)
        copy_side_files(side_files, tmp, SIDE_FILES)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    return all_gather_objects((writer.count, writer.total_bytes) if writer else None)[0]


def _write_config(directory: Path, hf_cfg: Dict, dtype: torch.dtype) -> None:
    cfg = dict(hf_cfg)
    name = str(dtype).replace("torch.", "")
    for key in ("dtype", "torch_dtype"):
        if key in cfg or key == "dtype":
            cfg[key] = name
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _megatron_logits(model, tokens: torch.Tensor, tp_group) -> torch.Tensor:
    from megatron_rl.parallel.weight_comm import gather_pieces

    with torch.no_grad():
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        local = model(input_ids=tokens, position_ids=positions, attention_mask=None)
    return torch.cat(gather_pieces(local.float(), tp_group), dim=-1)


def _hf_logits(hf_dir: os.PathLike, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def verify(hf_dir: os.PathLike, ckpt: os.PathLike, layout: Layout = Layout(),
           num_prompts: int = 4, prompt_len: int = 32, seed: int = 0) -> Dict[str, float]:
    """Logits of the HF model (transformers, fp32) and of the megatron checkpoint (fp32, this
    layout) on a fixed random prompt batch; returns the max and mean absolute difference."""
    from megatron_rl.train.parallel_init import destroy_megatron_parallel

    init_distributed()
    if layout.pp > 1:
        raise ValueError("convert verify runs with --pp 1 (distributed checkpoints reshard on "
                         "load, so any TP/EP layout checks the same weights)")
    hf = _everywhere(lambda: load_hf_config(hf_dir))
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, hf.vocab_size, (num_prompts, prompt_len), generator=g)
    model, groups = _build(hf, layout, torch.float32)
    try:
        _everywhere(lambda: load_model(ckpt, model))
        ours = _megatron_logits(model, tokens, groups.tp)
    finally:
        destroy_megatron_parallel()
    theirs = _hf_logits(hf_dir, tokens)
    diff = (ours - theirs).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "logit_scale": float(theirs.abs().max()), "tokens": int(tokens.numel())}
