"""Peak memory and time of the fused vocab-parallel log-prob + entropy vs a naive fp32 log_softmax.

    python bench/vocab_parallel.py                      # 8192 tokens, V = 151936 (Qwen3), TP 1 and 2
    python bench/vocab_parallel.py --tokens 2048 --vocab 32000

Each measurement runs in a fresh process: bf16 logits ``[tokens, V/tp]`` are allocated, the peak
RSS is reset (/proc/self/clear_refs), then forward + backward of ``sum(w1*lp + w2*H)`` runs and
the new peak minus the RSS before it is the "extra" memory. Ratios are against the naive path
measured in the same run: ``logits.float().log_softmax(-1)`` over the full vocabulary (lp only,
and lp + entropy where it fits in this machine's memory). TP=2 runs two gloo processes, one
thread each; TP=1 runs use all threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from megatron_rl.parallel.launch import free_port

QWEN3_VOCAB = 151936


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(args) -> None:
    import torch
    import torch.distributed as dist

    from megatron_rl.parallel.vocab_parallel import vocab_parallel_logprobs

    torch.set_num_threads(args.threads)
    group, rank = None, 0
    if args.tp > 1:
        rank = args.rank
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank,
                                world_size=args.tp)
        group = dist.group.WORLD
    vs = args.vocab // args.tp
    g = torch.Generator().manual_seed(rank)
    logits = torch.empty(args.tokens, vs, dtype=torch.bfloat16)
    for s in range(0, args.tokens, 256):  # fill in slices: no full-size fp32 temporary
        logits[s:s + 256] = torch.randn(min(256, args.tokens - s), vs, generator=g) * 3
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=torch.Generator().manual_seed(9))
    w1, w2 = torch.randn(args.tokens, generator=g), torch.randn(args.tokens, generator=g)
    logits.requires_grad_()

    def run():
        if args.mode == "ours":
            lp, ent = vocab_parallel_logprobs(logits, labels, tp_group=group, vocab_start=rank * vs,
                                              chunk_tokens=args.chunk_tokens)
        else:
            logp = logits.float().log_softmax(-1)
            lp = logp.gather(1, labels[:, None]).squeeze(1)
            ent = -(logp.exp() * logp).sum(-1) if args.entropy else None
        loss = (lp * w1).sum() + ((ent * w2).sum() if args.entropy else 0.0)
        loss.backward()

    times = []
    for i in range(args.repeats):
        logits.grad = None
        if i == 0:
            base = _rss_bytes("VmRSS:")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS mark to the current RSS
        if group is not None:
            dist.barrier(group)
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        if i == 0:
            peak = _rss_bytes("VmHWM:")
    print(json.dumps({"rank": rank, "extra": peak - base, "logits": logits.numel() * 2,
                      "seconds": min(times)}))
    if group is not None:
        dist.destroy_process_group()


def _launch(a, mode: str, tp: int, entropy: bool) -> dict:
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // tp)
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--tp", str(tp), "--port", str(port),
           "--tokens", str(a.tokens), "--vocab", str(a.vocab), "--repeats", str(a.repeats),
           "--threads", str(threads)]
    if entropy:
        cmd.append("--entropy")
    if a.chunk_tokens:
        cmd += ["--chunk-tokens", str(a.chunk_tokens)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = [subprocess.Popen(cmd + ["--rank", str(r)], stdout=subprocess.PIPE, text=True, env=env)
             for r in range(tp)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{mode} tp={tp} failed")
    worst = max(outs, key=lambda o: o["extra"])
    return {"extra": worst["extra"], "logits": worst["logits"],
            "seconds": max(o["seconds"] for o in outs)}




def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=QWEN3_VOCAB)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--chunk-tokens", type=int, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--entropy", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return _child(a)
    gib = 2.0 ** 30
    full_fp32 = a.tokens * a.vocab * 4
    print(f"tokens={a.tokens} vocab={a.vocab} bf16 logits={a.tokens * a.vocab * 2 / gib:.2f} GiB "
          f"cpus={os.cpu_count()} torch threads: TP=1 all, TP=2 one per rank")
    rows = []
    for entropy in (False, True):
        what = "lp+entropy" if entropy else "lp"
        # measured at small sizes: the naive peak is ~3x (lp) / ~5x (lp+entropy) the fp32 logits
        naive_need = full_fp32 * (5.1 if entropy else 3.1) + a.tokens * a.vocab * 2
        if naive_need > 0.9 * _available_bytes():
            naive = None
            print(f"naive {what}: skipped, needs ~{naive_need / gib:.0f} GiB, "
                  f"{_available_bytes() / gib:.0f} GiB available")
        else:
            naive = _launch(a, "naive", 1, entropy)
            rows.append((f"naive fp32 log_softmax, {what}", 1, naive, naive))
        for tp in (1, 2):
            rows.append((f"fused vocab-parallel, {what}", tp, _launch(a, "ours", tp, entropy), naive))
    print(f"{'path':38s} {'TP':>2s} {'extra GiB':>9s} {'x logits shard':>14s} {'seconds':>8s} "
          f"{'time / naive':>12s} {'mem / naive':>11s}")
    for name, tp, r, base in rows:
        tr = f"{r['seconds'] / base['seconds']:.2f}" if base else "n/a"
        mr = f"{r['extra'] / base['extra']:.3f}" if base else "n/a"
        print(f"{name:38s} {tp:2d} {r['extra'] / gib:9.2f} {r['extra'] / r['logits']:14.2f} "
              f"{r['seconds']:8.2f} {tr:>12s} {mr:>11s}")
    _precision(a.vocab)


def _precision(vocab: int, tokens: int = 64) -> None:
    """fp32 error against float64, fused kernel vs a plain fp32 ``log_softmax``, on N(0, s^2)
    logits: the ratio is the fused kernel's max abs error over the plain one's."""
    import torch

    from megatron_rl.parallel.vocab_parallel import vocab_parallel_logprobs

    print(f"\nfp32 precision against float64, {tokens} tokens, vocab {vocab}")
    print(f"{'logit std':>9s} {'entropy':>8s} {'plain H err':>11s} {'fused H err':>11s} {'ratio':>6s} "
          f"{'plain lp err':>12s} {'fused lp err':>12s}")
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 3.0, 10.0):
        z = torch.randn(tokens, vocab, generator=g) * scale
        t = torch.randint(0, vocab, (tokens,), generator=g)
        ref = torch.log_softmax(z.double(), -1)
        ref_h, ref_lp = -(ref.exp() * ref).sum(-1), ref.gather(1, t[:, None]).squeeze(1)
        lsm = torch.log_softmax(z, -1)
        plain_h, plain_lp = -(lsm.exp() * lsm).sum(-1), lsm.gather(1, t[:, None]).squeeze(1)
        lp, h = vocab_parallel_logprobs(z, t)
        e = [(x.double() - r).abs().max().item()
             for x, r in ((plain_h, ref_h), (h, ref_h), (plain_lp, ref_lp), (lp, ref_lp))]
        print(f"{scale:9.1f} {ref_h.mean().item():8.3f} {e[0]:11.2e} {e[1]:11.2e} {e[1] / e[0]:6.2f} "
              f"{e[2]:12.2e} {e[3]:12.2e}")


if __name__ == "__main__":
    main()
