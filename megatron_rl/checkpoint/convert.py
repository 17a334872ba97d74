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
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, TypeVar

import torch

from megatron_rl.checkpoint.dist_ckpt import (_rank, CRITIC_MARKER, load_model, model_info,
                                              save_model, check_model_checkpoint)
from megatron_rl.checkpoint.hf_io import SIDE_FILES, HFReader, HFWriter, copy_side_files
from megatron_rl.checkpoint.hf_mapping import (IGNORED_HF, mapping_for, trunk_config,
                                               value_model_config, value_model_mapping)
from megatron_rl.checkpoint.export_stream import on_meta, stream_hf_weights
from megatron_rl.checkpoint.hf_weights import hf_layout, hf_plan, iter_hf_weights, load_hf_weights
from megatron_rl.model.build import ModelOptions
from megatron_rl.model.hf_config import HFModel, load_hf_config, read_config_json
from megatron_rl.parallel.config import Layout
from megatron_rl.parallel.launch import init_distributed
from megatron_rl.parallel.weight_comm import all_gather_objects, gather_pieces
from megatron_rl.runtime.model_setup import build_model, unwrap
from megatron_rl.runtime.parallel_init import (destroy_megatron_parallel,
                                               init_megatron_parallel, weight_groups)

T = TypeVar("T")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass
class Report:
    """What a conversion moved: tensors, bytes and seconds."""
    tensors: int
    bytes: int
    seconds: float
    notes: str = ""
    verified: Optional[Dict[str, float]] = None   # the import's logit check, when it ran

    def line(self, what: str) -> str:
        """One line for the console: counts, size and rate."""
        gb = self.bytes / 1e9
        rate = gb / self.seconds if self.seconds > 0 else float("inf")
        return (f"{what}: {self.tensors} tensors, {gb:.3f} GB in {self.seconds:.2f} s "
                f"({rate:.2f} GB/s){self.notes}")


def _one_line(e: BaseException) -> str:
    """A bad-input exception as one line: ours already are; a ``KeyError`` names its key, the
    safetensors / shape errors of a file that does not match its index or config are prefixed."""
    if isinstance(e, ValueError):
        return " ".join(str(e).split())
    detail = e.args[0] if isinstance(e, KeyError) and e.args else e
    return " ".join(f"{type(e).__name__}: {detail}".split())[:600]


# what a bad input raises from inside safetensors / torch / transformers (safetensors' own error
# type derives from Exception only)
BAD_INPUT = (ValueError, KeyError, IndexError, TypeError, RuntimeError, OSError, AssertionError)


def _everywhere(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raised on any, raise the first message on all, as one line
    (``ValueError``: the CLI's exit status 2)."""
    err, out = None, None
    try:
        out = fn()
    except BAD_INPUT as e:
        err = _one_line(e)
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError, huggingface_hub errors
        if type(e).__module__.split(".")[0] not in ("safetensors", "huggingface_hub"):
            raise  # anything else is a bug, not bad input: keep its traceback
        err = _one_line(e)
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


def _build(hf: HFModel, layout: Layout, dtype: torch.dtype, value_head: bool = False,
           meta: bool = False):
    init_megatron_parallel(layout, seed=0)   # enters the CPU patches' modes: not under on_meta
    try:
        with on_meta() if meta else nullcontext():
            [model], _ = build_model(hf, layout, ModelOptions(params_dtype=dtype,
                                                              init_weights=False),
                                     ddp=False, value_head=value_head)
    except BaseException:
        destroy_megatron_parallel()
        raise
    return model, weight_groups()


def _mtp_layer(name: str, hf_cfg: Dict) -> bool:
    """DeepSeek-V3 checkpoints carry ``num_nextn_predict_layers`` multi-token-prediction layers
    after the last decoder layer; RL training does not use them (any other extra layer is an
    error: the config disagrees with the weights)."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    n = int(hf_cfg.get("num_hidden_layers", 0))
    return bool(m) and n <= int(m[1]) < n + int(hf_cfg.get("num_nextn_predict_layers") or 0)


def import_hf(hf_dir: os.PathLike, out: os.PathLike, layout: Layout = Layout(),
              dtype: str = "auto", allow_unknown_keys: bool = False, check: bool = True,
              tolerance: float = 1e-3) -> Report:
    """HF directory -> model-only distributed checkpoint at ``out`` (collective). With ``check``
    the model's logits are compared with transformers' on fixed prompts (when both fp32 models
    fit in host memory): an fp32 import at ``--pp 1`` checks the model in memory before saving;
    any other checks its mapping at fp32 and ``--pp 1`` after saving. A difference above
    ``tolerance`` fails, and leaves nothing behind."""
    init_distributed()
    out = Path(out)
    reader = _everywhere(lambda: HFReader(hf_dir))
    hf_cfg = _everywhere(reader.config)
    hf = _everywhere(lambda: load_hf_config(hf_cfg, allow_unknown_keys))
    mapping = _everywhere(lambda: mapping_for(hf))
    params_dtype = _everywhere(lambda: _dtype(dtype, hf_cfg))
    _everywhere(lambda: _require_empty(out))
    t0 = time.perf_counter()
    model, groups = _everywhere(lambda: _build(hf, layout, params_dtype))
    checked = None
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
        nbytes = sum(reader.shape_bytes(n) for n in used)
        # rank 0 runs transformers: its host decides, for every rank
        skip_why = all_gather_objects(_skip_check(check, sum(4 * math.prod(reader.shape(n))
                                                             for n in used)))[0]
        if skip_why is None and layout.pp == 1 and params_dtype == torch.float32:
            checked = _judge(hf_dir, _compare(hf_dir, hf, model, groups), tolerance, None)
        info = {"format": "megatron_rl.model/1", "architecture": hf.architecture,
                "dtype": str(params_dtype).replace("torch.", ""), "source": str(Path(hf_dir).resolve()),
                "hf_tensors": len(used)}
        save_model(out, model, info, hf_files=hf_dir)
    finally:
        destroy_megatron_parallel()
    seconds = time.perf_counter() - t0
    if skip_why is None and checked is None:  # bf16 or pipelined: the same mapping at fp32
        checked = _judge(hf_dir, _check_mapping_fp32(hf_dir, reader, hf, mapping, layout),
                         tolerance, out)
    notes = [f"skipped {len(skipped)} multi-token-prediction tensors"] if skipped else []
    if hf.ignored:
        notes.append("ignored config.json keys " + ", ".join(f"{k}={v!r}" for k, v in hf.ignored))
    notes.append(skip_why or "verified: " + _diff_line(checked))
    return Report(len(used), nbytes, seconds, "; " + "; ".join(notes), checked)


def _check_mapping_fp32(hf_dir, reader: HFReader, hf: HFModel, mapping, layout: Layout):
    """The import's mapping at its TP/EP layout (``--pp 1``), loaded at fp32 from the same
    files, against transformers (collective). A lower-precision checkpoint holds these tensors
    cast: comparing at fp32 isolates the mapping from rounding."""
    at = Layout(tp=layout.tp, ep=layout.ep, etp=layout.etp)
    model, groups = _everywhere(lambda: _build(hf, at, torch.float32))
    try:
        _everywhere(lambda: load_hf_weights(model, reader, mapping, groups, hf.num_experts))
        return _compare(hf_dir, hf, model, groups)
    finally:
        destroy_megatron_parallel()


def _skip_check(check: bool, fp32_bytes: int) -> Optional[str]:
    """Why the import is not checked against transformers (None: it is)."""
    if not check:
        return "not verified (--no-verify): run convert verify before training"
    need, free = 3 * fp32_bytes, _available_memory()
    if need > free:
        return (f"not verified: the fp32 models need ~{need / 1e9:.1f} GB, the host has "
                f"{free / 1e9:.1f} GB available; run convert verify on a larger host")
    return None


def _diff_line(r: Dict[str, float]) -> str:
    return (f"max |logit diff| vs transformers {r['max_abs_diff']:.2e} "
            f"(logits up to {r['logit_scale']:.3g}, {r['tokens']} tokens)")


def _judge(hf_dir, r: Dict[str, float], tolerance: float, saved: Optional[Path]) -> Dict[str, float]:
    """``r`` when within ``tolerance``; else the import fails (removing ``saved``, if any)."""
    if r["max_abs_diff"] <= tolerance:
        return r
    import torch.distributed as dist

    if saved is not None and _rank() == 0:
        shutil.rmtree(saved, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    raise ValueError(f"{hf_dir}: the imported model does not reproduce transformers: "
                     f"{_diff_line(r)} > --verify-tolerance {tolerance:g} (nothing was kept); "
                     "please report this config.json")


def _available_memory() -> int:
    """Host memory this process may still use (MemAvailable), per rank on this host."""
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 1 << 62  # unknown: try
    return kb * 1024 // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


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
              dtype: Optional[str] = None, shard_bytes: int = 4 << 30,
              allow_unknown_keys: bool = False, stream: bool = True) -> Report:
    """Distributed checkpoint -> HF directory at ``out`` (collective; rank 0 writes). A training
    checkpoint's ``critic/`` (PPO) exports as the architecture's token classifier. ``stream``:
    the model on the meta device, loaded and exported one segment (a decoder layer) at a time
    (``export_stream``: a model larger than host memory, and faster); False loads it whole."""
    init_distributed()
    ckpt, out = Path(ckpt), Path(out)
    critic = (ckpt / CRITIC_MARKER).is_file()
    cfg_path = _everywhere(lambda: _hf_config_for(ckpt, hf_config))
    hf_cfg = _everywhere(lambda: read_config_json(cfg_path))
    if critic:   # the critic's own exported config.json is as good as the policy's
        hf_cfg = trunk_config(hf_cfg)
    hf = _everywhere(lambda: load_hf_config(hf_cfg, allow_unknown_keys))
    mapping = _everywhere(lambda: mapping_for(hf))
    if critic:
        mapping = value_model_mapping(mapping)
        hf_cfg = _everywhere(lambda: value_model_config(hf_cfg))
    _everywhere(lambda: _require_empty(out))
    info = model_info(ckpt) or {}
    params_dtype = DTYPES[info.get("dtype", "float32")]
    out_dtype = _everywhere(lambda: _dtype(dtype, hf_cfg) if dtype else params_dtype)
    t0 = time.perf_counter()
    model, groups = _everywhere(lambda: _build(hf, layout, params_dtype, value_head=critic,
                                               meta=stream))
    try:
        _everywhere(lambda: check_model_checkpoint(ckpt) if stream else load_model(ckpt, model))
        side = tokenizer or (ckpt / "hf" if (ckpt / "hf").is_dir() else None)
        count, nbytes = write_hf_model(model, hf, mapping, groups, hf_cfg, out, out_dtype, side,
                                       shard_bytes, stream_from=ckpt if stream else None)
    finally:
        destroy_megatron_parallel()
    return Report(count, nbytes, time.perf_counter() - t0)


def write_hf_model(model, hf: HFModel, mapping, groups, hf_cfg: Dict, out: Path,
                   dtype: torch.dtype, side_files: Optional[os.PathLike] = None,
                   shard_bytes: int = 4 << 30, tokenizer=None,
                   stream_from: Optional[Path] = None):
    """The weights of ``model`` (any layout, collective) as an HF directory at ``out``, written
    by rank 0 to ``.<name>.partial`` and renamed when complete; ``config.json`` from ``hf_cfg``,
    tokenizer and generation files copied from ``side_files`` (or ``tokenizer`` saved). A failed
    write (a full disk) removes the partial directory: ``out`` is whole or absent. Returns
    ``(tensors, bytes)``."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    writer = None
    planned = hf_plan(unwrap(model), mapping, groups, hf.num_experts)
    try:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            writer = HFWriter(tmp, hf_layout(planned[0], mapping, dtype), shard_bytes)
        weights = stream_hf_weights(unwrap(model), stream_from, mapping, groups, hf.num_experts,
                                    planned, dst=0) if stream_from is not None else \
            iter_hf_weights(unwrap(model), mapping, groups, hf.num_experts, dst=0, planned=planned)
        for name, t in weights:
            writer.add(name, t.to(dtype))
        if writer is not None:
            writer.close()
            _write_config(tmp, hf_cfg, dtype)
            copy_side_files(side_files, tmp, SIDE_FILES)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.replace(tmp, out)
    except BaseException:
        if writer is not None:
            writer.abort()
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return all_gather_objects((writer.count, writer.total_bytes) if writer else None)[0]


def write_side_files(directory: Path, hf_cfg: Dict, dtype: torch.dtype, tokenizer=None,
                     critic: bool = False) -> None:
    """``directory/hf/`` (config.json and the tokenizer), and with ``critic`` the same for
    ``directory/critic/hf`` with the token classifier's config: a training checkpoint then
    exports (``convert export``) with no ``--hf-config``."""
    for sub, cfg in [("hf", hf_cfg)] + ([("critic/hf", value_model_config(hf_cfg))] if critic else []):
        d = Path(directory) / sub
        d.mkdir(parents=True, exist_ok=True)
        _write_config(d, cfg, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(d))


def _write_config(directory: Path, hf_cfg: Dict, dtype: torch.dtype) -> None:
    cfg = dict(hf_cfg)
    name = str(dtype).replace("torch.", "")
    for key in ("dtype", "torch_dtype"):
        if key in cfg or key == "dtype":
            cfg[key] = name
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _megatron_logits(model, tokens: torch.Tensor, tp_group) -> torch.Tensor:
    with torch.no_grad():
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        local = model(input_ids=tokens, position_ids=positions, attention_mask=None)
    return torch.cat(gather_pieces(local.float(), tp_group), dim=-1)


def _hf_logits(hf_dir: os.PathLike, tokens: torch.Tensor,
               weights: torch.dtype = torch.float32) -> torch.Tensor:
    """transformers' fp32 forward, its weights first rounded to ``weights`` (the checkpoint's
    dtype: a bf16 import is compared with the same bf16 weights, not with the fp32 files)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=weights).float()
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def _prompts(hf: HFModel, num_prompts: int = 4, prompt_len: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, hf.vocab_size, (num_prompts, min(prompt_len, hf.max_position_embeddings)),
                         generator=g)


def _compare(hf_dir: os.PathLike, hf: HFModel, model, groups,
             weights: torch.dtype = torch.float32, **prompts) -> Dict[str, float]:
    """The megatron ``model`` (this layout, collective) against transformers' forward of
    ``hf_dir`` (fp32 with ``weights``-rounded weights, rank 0 only) on fixed random prompts;
    the result on every rank."""
    tokens = _prompts(hf, **prompts)
    model.eval()
    ours = _megatron_logits(model, tokens, groups.tp)
    result = None
    if _rank() == 0:
        try:
            theirs = _hf_logits(hf_dir, tokens, weights)
        except Exception as e:  # noqa: BLE001 - reported on every rank, not only here
            result = {"error": f"{hf_dir}: transformers cannot run this model: {_one_line(e)}"}
        else:
            diff = (ours - theirs).abs()
            result = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                      "logit_scale": float(theirs.abs().max()), "tokens": int(tokens.numel())}
    result = all_gather_objects(result)[0]
    if "error" in result:
        raise ValueError(result["error"])
    return result


def verify(hf_dir: os.PathLike, ckpt: os.PathLike, layout: Layout = Layout(),
           hf: Optional[HFModel] = None, allow_unknown_keys: bool = False,
           **prompts) -> Dict[str, float]:
    """Logits of the HF model (transformers, fp32, on rank 0) and of the megatron checkpoint
    (fp32, this layout) on a fixed random prompt batch; the max and mean absolute difference,
    on every rank."""
    init_distributed()
    if layout.pp > 1:
        raise ValueError("convert verify runs with --pp 1 (distributed checkpoints reshard on "
                         "load, so any TP/EP layout checks the same weights)")
    if hf is None:
        hf = _everywhere(lambda: load_hf_config(hf_dir, allow_unknown_keys))
    model, groups = _everywhere(lambda: _build(hf, layout, torch.float32))
    try:
        _everywhere(lambda: load_model(ckpt, model))
        weights = DTYPES[(model_info(Path(ckpt)) or {}).get("dtype", "float32")]
        return _compare(hf_dir, hf, model, groups, weights, **prompts)
    finally:
        destroy_megatron_parallel()
