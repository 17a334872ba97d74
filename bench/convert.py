"""HF <-> megatron-core conversion throughput (GB/s) against a plain safetensors copy.

    python bench/convert.py                 # ~0.5 GB bf16 Qwen3-MoE-shaped model, world of one
    python bench/convert.py --size tiny
    python bench/convert.py --stream-ab     # plus export whole vs streamed, fresh processes

The baseline, measured in the same run on the same files: read every tensor of the HF directory
with safetensors and write it back out (the I/O floor any converter pays). Import = HF directory
-> megatron-core distributed checkpoint (model build, fuse, shard, save); export = back to a
sharded safetensors directory (load, gather, split, write). Both include building the model, not
megatron-core's first module import (reported apart: a start-up cost, not a per-byte one).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import tempfile
import time

SIZES = {
    # 16 experts top-2, 8 layers: ~0.25B parameters, ~0.5 GB in bf16
    "small": {"vocab_size": 32000, "hidden_size": 1024, "num_hidden_layers": 8,
              "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128,
              "moe_intermediate_size": 512, "num_experts": 16, "num_experts_per_tok": 2},
    "tiny": {},
}


def _copy_baseline(src: str, dst: str) -> float:
    from safetensors.torch import load_file, save_file

    os.makedirs(dst)
    t = time.perf_counter()
    for f in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        save_file(load_file(f), os.path.join(dst, os.path.basename(f)))
    return time.perf_counter() - t


def _export_child(ckpt: str, out: str, stream: bool) -> None:
    """One export in this fresh process; prints seconds, the process's resident memory before
    it and its peak (``VmHWM``: ``ru_maxrss`` would carry the forking parent's) as JSON."""
    import importlib

    importlib.import_module("megatron.core.models.gpt")
    from megatron_rl.checkpoint.convert import export_hf

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(field + ":"))

    before = status("VmRSS")
    r = export_hf(ckpt, out, stream=stream)
    peak = status("VmHWM")
    print(json.dumps({"seconds": r.seconds, "rss_before": before, "rss_peak": peak}))


def _stream_ab(ckpt: str, root: str, rounds: int = 2) -> dict:
    """Whole-model and streamed export of ``ckpt``, alternating, each in a fresh process."""
    import subprocess
    import sys

    res = {"whole": [], "streamed": []}
    for i in range(rounds):
        for side in ("whole", "streamed"):
            out = os.path.join(root, f"ab_{side}_{i}")
            # not this process's rendezvous: the child starts its own world of one
            env = {k: v for k, v in os.environ.items() if k not in (
                "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                "LOCAL_WORLD_SIZE")}
            r = subprocess.run([sys.executable, __file__, "--export-child", ckpt, out, side],
                               capture_output=True, text=True, check=True, env=env)
            res[side].append(json.loads(r.stdout.strip().splitlines()[-1]))
            shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--json")
    ap.add_argument("--stream-ab", action="store_true",
                    help="also export whole and streamed in fresh processes: time, peak memory")
    ap.add_argument("--export-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.export_child:
        ckpt, out, side = args.export_child
        _export_child(ckpt, out, side == "streamed")
        return

    import torch

    from megatron_rl.checkpoint.convert import export_hf, import_hf
    from megatron_rl.model.tiny import write_tiny_hf_model

    # megatron-core's first import (torch.compile set-up in its fusions) takes 3-4 s on this
    # machine whatever the model's size: a one-time start-up cost, timed apart from the conversion
    t = time.perf_counter()
    import megatron.core.models.gpt  # noqa: F401

    from megatron_rl.runtime import parallel_init  # noqa: F401
    module_import_s = time.perf_counter() - t

    torch.set_num_threads(os.cpu_count() or 1)
    root = tempfile.mkdtemp(prefix="bench_convert_")
    try:
        hf = os.path.join(root, "hf")
        write_tiny_hf_model("qwen3_moe", hf, seed=0, **SIZES[args.size])
        # bf16 like released checkpoints (the writer above keeps transformers' fp32)
        from safetensors.torch import load_file, save_file

        for f in glob.glob(os.path.join(hf, "*.safetensors")):
            save_file({k: v.bfloat16() for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
        cfg_path = os.path.join(hf, "config.json")
        cfg = json.load(open(cfg_path))
        cfg["dtype"] = "bfloat16"
        json.dump(cfg, open(cfg_path, "w"))
        gb = sum(os.path.getsize(f) for f in glob.glob(os.path.join(hf, "*.safetensors"))) / 1e9
        base = _copy_baseline(hf, os.path.join(root, "copy"))
        imp = import_hf(hf, os.path.join(root, "mc"))
        exp = export_hf(os.path.join(root, "mc"), os.path.join(root, "out"), stream=False)
        res = {"size": args.size, "gb": gb, "threads": torch.get_num_threads(),
               "megatron_core_import_s": module_import_s,
               "baseline_copy_s": base, "import_s": imp.seconds, "export_s": exp.seconds,
               "baseline_gb_s": gb / base, "import_gb_s": gb / imp.seconds,
               "export_gb_s": gb / exp.seconds,
               "import_over_copy": imp.seconds / base, "export_over_copy": exp.seconds / base}
        if args.stream_ab:
            res["stream_ab"] = _stream_ab(os.path.join(root, "mc"), root)
        print(json.dumps(res, indent=1))
        if args.json:
            json.dump(res, open(args.json, "w"), indent=1)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
