"""Checkpoint metadata passes at MoE expert-grid scale: torch's against ours (dcp_scale).

    python bench/ckpt_planning.py                 # the three passes, grids up to DeepSeek-V3's
    python bench/ckpt_planning.py --convert 24x128 # plus import + export of a narrow model

Part 1 times, in one process, the three passes ``megatron_rl.checkpoint.dcp_scale`` replaces on
the shard grid megatron-core writes for one routed-expert fc1 key (layers x experts x gate/up
halves): shard overlap validation (run twice per key at every save and load), read planning
(every load) and write-item lookup (every save). Torch's pass is skipped (and says so) where the
previous size's time predicts more than ``--budget`` seconds.

Part 2 (``--convert LxE``) runs HF import and export of a narrow Qwen3-MoE with L layers of E
experts (hidden 32: the metadata, not the bytes, is what grows), each side in a fresh process:
with torch's passes and with ours.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _grid(layers: int, experts: int):
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    import torch

    boxes = [([l, e, h * 512, 0], [1, 1, 512, 1024]) for l in range(layers)
             for e in range(experts) for h in range(2)]
    shards = [ShardMetadata(o, s, "rank:0/cpu") for o, s in boxes]
    chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in boxes]
    return shards, chunks


def _passes(layers: int, experts: int):
    """``{pass: (torch's fn, ours)}`` as zero-argument calls on one grid."""
    import torch
    from torch.distributed._shard.sharding_spec import _internals
    from torch.distributed.checkpoint import planner_helpers, utils
    from torch.distributed.checkpoint.metadata import (MetadataIndex, TensorProperties,
                                                       TensorStorageMetadata)

    from megatron_rl.checkpoint.dcp_scale import (ShardIndex, create_read_items_for_chunk_list,
                                                  find_nd_overlapping_shards)
    shards, chunks = _grid(layers, experts)
    md = TensorStorageMetadata(TensorProperties(dtype=torch.bfloat16),
                               torch.Size([layers, experts, 1024, 1024]), chunks)
    # megatron-core's local shards are in grid order, its write items' index hints are not
    from types import SimpleNamespace
    local = [SimpleNamespace(metadata=s, tensor=None) for s in shards]
    tensor = SimpleNamespace(local_shards=lambda: local)
    index = [MetadataIndex("w", torch.Size(s.shard_offsets), None) for s in shards]
    o_val, o_read, o_find = (_internals._find_nd_overlapping_shards,
                             planner_helpers.create_read_items_for_chunk_list, utils._find_shard)
    find = ShardIndex(o_find)
    return {
        "validate": (lambda: o_val(shards, [0, 1, 2]),
                     lambda: find_nd_overlapping_shards(shards, [0, 1, 2], o_val)),
        "read plan": (lambda: o_read("w", md, chunks),
                      lambda: create_read_items_for_chunk_list("w", md, chunks, o_read)),
        "write lookup": (lambda: [o_find(tensor, i) for i in index],
                         lambda: [find(tensor, i) for i in index]),
    }


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def part1(sizes, budget: float):
    """Rows ``(grid, shards, pass, torch s or None, ours s)``."""
    rows, last = [], {}
    for layers, experts in sizes:
        n = layers * experts * 2
        for name, (theirs, ours) in _passes(layers, experts).items():
            prev = last.get(name)
            # quadratic: the previous size's time times the squared growth in shards
            predicted = prev[1] * (n / prev[0]) ** 2 if prev else 0.0
            t_theirs = _time(theirs) if predicted <= budget else None
            if t_theirs is not None:
                last[name] = (n, t_theirs)
            rows.append((f"{layers}x{experts}x2", n, name, t_theirs, _time(ours)))
            print(rows[-1], flush=True)
    return rows


def _convert_child(layers: int, experts: int, ours: bool) -> dict:
    """One import + export in this process (``--child``)."""
    import importlib
    from contextlib import nullcontext

    importlib.import_module("megatron.core.models.gpt")  # its first import is not conversion time

    from megatron_rl.checkpoint import dist_ckpt
    from megatron_rl.checkpoint.convert import export_hf, import_hf
    from megatron_rl.model.tiny import write_tiny_hf_model
    if not ours:
        dist_ckpt.scalable_planning = nullcontext
    root = tempfile.mkdtemp(prefix="bench_ckpt_planning_")
    hf = os.path.join(root, "hf")
    write_tiny_hf_model("qwen3_moe", hf, seed=0, vocab_size=256, hidden_size=32,
                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=16, moe_intermediate_size=16, num_experts=experts,
                        num_experts_per_tok=2)
    imp = import_hf(hf, os.path.join(root, "mc"), check=False)
    exp = export_hf(os.path.join(root, "mc"), os.path.join(root, "out"))
    import shutil
    shutil.rmtree(root, ignore_errors=True)
    return {"import_s": imp.seconds, "export_s": exp.seconds}


def part2(layers: int, experts: int) -> dict:
    """Import/export seconds with torch's passes and with ours, fresh processes."""
    out = {}
    for side in ("torch", "ours"):
        r = subprocess.run([sys.executable, __file__, "--child", f"{layers}x{experts}", side],
                           capture_output=True, text=True, check=True)
        out[side] = json.loads(r.stdout.strip().splitlines()[-1])
        print(side, out[side], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="8x32,16x64,32x128,61x256",
                    help="layers x experts grids for part 1")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="skip torch's pass where predicted to take longer (s)")
    ap.add_argument("--convert", help="LxE: also import + export such a model (part 2)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.child:
        layers, experts = map(int, args.child[0].split("x"))
        print(json.dumps(_convert_child(layers, experts, args.child[1] == "ours")))
        return
    sizes = [tuple(map(int, s.split("x"))) for s in args.sizes.split(",")]
    res = {"part1": part1(sizes, args.budget)}
    for grid, n, name, theirs, ours in res["part1"]:
        ratio = f"{ours / theirs:.4f}x" if theirs else "torch's skipped (over budget)"
        torch_s = f"{theirs:8.3f} s" if theirs else "       - "
        print(f"{grid:>12} {n:>6} shards  {name:<12} torch {torch_s}  ours {ours:6.3f} s  {ratio}")
    if args.convert:
        layers, experts = map(int, args.convert.split("x"))
        res["part2"] = part2(layers, experts)
        t, o = res["part2"]["torch"], res["part2"]["ours"]
        print(f"convert {args.convert}: import {o['import_s'] / t['import_s']:.2f}x, "
              f"export {o['export_s'] / t['export_s']:.2f}x of torch's passes")
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
