"""One command for a single GPU: the GPU tests, the benchmarks that need one, one summary.

    make gpu-check                       # or: python tools/gpu_check.py --out runs/gpu_check
    python tools/gpu_check.py --dry-run  # the same steps on CPU at toy sizes (CI runs this)

Made for a bare CUDA box (Python 3.12, its own CUDA torch, no TransformerEngine, no vLLM, no
network): ``make gpu-wheels`` (on a machine with network) downloads megatron-core and the few
other missing packages into ``gpu_wheels/`` (under 50 MB); ``make gpu-check`` installs from that
folder only, then runs this. Steps, each in its own process with a time limit (about 8 minutes in
all on one H200):

1. ``pytest tests/gpu`` (bf16 fused log-prob/entropy; a bf16 RL step with device batches);
2. ``bench/moe_step.py --size 1.9b``: bf16 training steps of a 1.9B-parameter, 16-expert top-2
   MoE, tokens/s and MFU, our GSPO loss against Megatron's cross-entropy in the same run;
3. ``bench/vocab_vs_megatron.py`` at 8k and 32k tokens (V = 151,936): our fused log-prob (+
   entropy) against Megatron's fused ``vocab_parallel_cross_entropy``;
4. the context-parallel attention's code path at CP 1 on the device against SDPA's causal
   kernel (agreement and time; CP > 1 needs several GPUs).

Writes ``summary.json`` and ``summary.md`` (the rows docs/benchmarks.md takes) under ``--out``
(default ``$OUT`` when set, else ``runs/gpu_check``). Exit status 1 if a step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _steps(dry: bool, out: Path):
    """(name, argv, time limit in seconds, JSON file the step writes or None)."""
    py = sys.executable
    moe = ["--size", "tiny", "--seq-len", "256", "--steps", "1", "--micro-batches", "1"] if dry \
        else ["--size", "1.9b", "--seq-len", "4096", "--steps", "5"]
    vocab = ["--tokens", "256", "--vocab", "2048", "--repeats", "1"] if dry else []
    return [
        ("gpu_tests", [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu",
                       str(ROOT / "tests" / "gpu")], 240, None),
        ("moe_step", [py, str(ROOT / "bench" / "moe_step.py"), *moe, "--json",
                      str(out / "moe_step.json")], 240, out / "moe_step.json"),
        ("vocab_vs_megatron", [py, str(ROOT / "bench" / "vocab_vs_megatron.py"), *vocab,
                               "--json", str(out / "vocab.json")], 180, out / "vocab.json"),
        ("cp_attention_cp1", [py, __file__, "--cp-attention", "--json", str(out / "cp_attn.json")]
         + (["--dry-run"] if dry else []), 120, out / "cp_attn.json"),
    ]


def cp_attention_check(dry: bool) -> dict:
    """The CP attention's code path (per-chunk masks, the K/V gather a no-op at CP 1) against
    SDPA's causal kernel on one sequence, bf16 on the GPU."""
    import torch
    import torch.nn.functional as F

    from megatron_rl.model.attention import context_parallel_attention

    gpu = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    S = 512 if dry else 8192
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(S, 1, h, 128, generator=g).to(dev, dtype) for h in (16, 4, 4))
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def timed(fn):
        fn()
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0

    ours, t_ours = timed(lambda: context_parallel_attention(q, k, v, cp_group=None, seq_lens=[S]))
    ref, t_ref = timed(lambda: F.scaled_dot_product_attention(
        *(x.permute(1, 2, 0, 3) for x in (q, k, v)), is_causal=True, enable_gqa=True
    ).permute(2, 0, 1, 3))
    return {"device": torch.cuda.get_device_name() if gpu else "cpu", "tokens": S,
            "max_abs_diff": float((ours.float() - ref.float()).abs().max()),
            "seconds_cp_path": t_ours, "seconds_sdpa_causal": t_ref}


def _markdown(summary: dict) -> str:
    lines = [f"# gpu-check ({summary['device']}, {summary['date']})", "",
             "| step | status | seconds | last line |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['last_line']} |"
              for s in summary["steps"]]
    res = summary["results"]
    if "moe_step" in res:
        m = res["moe_step"]
        lines += ["", f"MoE step ({m['size']}, {m['tokens_per_step']} tokens): Megatron CE "
                      f"{m['baseline']['tokens_per_s']:.0f} tokens/s, ours "
                      f"{m['ours']['tokens_per_s']:.0f} tokens/s (time x"
                      f"{m['ours_over_baseline_time']:.2f}), MFU {m['ours']['mfu']}"]
    for r in res.get("vocab_vs_megatron", {}).get("rows", []):
        lines.append(f"vocab {r['tokens']} tokens: ours lp+H {r['ours_lp_entropy']['time_vs_megatron']:.2f}x "
                     f"time, {r['ours_lp_entropy']['mem_vs_megatron']:.2f}x memory of Megatron's CE")
    if "cp_attention_cp1" in res:
        c = res["cp_attention_cp1"]
        lines.append(f"CP attention path at CP 1 ({c['tokens']} tokens): max |diff| "
                     f"{c['max_abs_diff']:.1e} against SDPA causal, {c['seconds_cp_path']:.4f} s "
                     f"vs {c['seconds_sdpa_causal']:.4f} s")
    return "\n".join(lines) + "\n"


def run_all(dry: bool, out: Path) -> int:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "date": time.strftime("%Y-%m-%d"), "dry_run": dry, "torch": torch.__version__,
               "steps": [], "results": {}}
    failed = 0
    for name, argv, limit, produced in _steps(dry, out):
        t0 = time.perf_counter()
        try:
            r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
            status = "ok" if r.returncode == 0 else f"failed (exit {r.returncode})"
            log = r.stdout + r.stderr
            shown = r.stdout if r.returncode == 0 and r.stdout.strip() else log
        except subprocess.TimeoutExpired as e:
            status, log = f"timed out after {limit} s", str(e.stdout or "") + str(e.stderr or "")
            shown = log
        (out / f"{name}.log").write_text(log)
        failed += status != "ok"
        tail = next((ln for ln in reversed(shown.splitlines()) if ln.strip()), "")
        summary["steps"].append({"name": name, "status": status, "last_line": tail[-200:],
                                 "seconds": time.perf_counter() - t0})
        if status == "ok" and produced is not None and produced.is_file():
            summary["results"][name] = json.loads(produced.read_text())
        print(f"{name}: {status} ({time.perf_counter() - t0:.0f} s)", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(_markdown(summary))
    print((out / "summary.md").read_text())
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks the script")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"))
    p.add_argument("--cp-attention", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.cp_attention:
        Path(a.json).write_text(json.dumps(cp_attention_check(a.dry_run)))
        return 0
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; use --dry-run to check the script on CPU",
              file=sys.stderr)
        return 2
    return run_all(a.dry_run, Path(a.out))


if __name__ == "__main__":
    sys.exit(main())
