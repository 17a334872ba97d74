"""Our fused log-prob (+ entropy) against Megatron's fused ``vocab_parallel_cross_entropy``, on one
device (the GPU when there is one), TP 1: time and peak memory of forward + backward.

    python bench/vocab_vs_megatron.py                       # 8192 and 32768 tokens, V = 151,936
    python bench/vocab_vs_megatron.py --tokens 512 --vocab 4096   # a CPU smoke run

The logits are bf16 ``[tokens, V]`` (what the model's output layer gives). Megatron's loss runs
as Megatron-LM calls it, on ``logits.float()`` (its kernel works in the input dtype and in place).
The loss backpropagated is ``sum(w * lp)`` (ours, log-probs only), ``sum(w1 * lp + w2 * H)``
(ours, with the entropy), ``sum(w * -CE)`` (Megatron: the same log-probs, no entropy). Peak
memory is what the pass adds over the logits already allocated (CUDA: ``max_memory_allocated``;
CPU: the resident-set high-water mark). Printed and written (``--json``) as ratios to Megatron's.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

QWEN3_VOCAB = 151936


def _peak_tracker(device):
    if device.type == "cuda":
        def reset():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()

        def peak():
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return reset, peak

    def rss(field):
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith(field))

    def reset_cpu():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return rss("VmRSS:")
    return reset_cpu, lambda: rss("VmHWM:")


def measure(tokens: int, vocab: int, repeats: int, device) -> dict:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_rl.parallel.vocab_parallel import vocab_parallel_logprobs

    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.empty(tokens, vocab, dtype=torch.bfloat16, device=device)
    for s in range(0, tokens, 1024):   # no full-size fp32 temporary
        logits[s:s + 1024] = (torch.randn(min(1024, tokens - s), vocab, generator=g) * 3).to(device)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    w1, w2 = (torch.randn(tokens, generator=g).to(device) for _ in range(2))
    logits.requires_grad_()

    def ours(entropy):
        lp, ent = vocab_parallel_logprobs(logits, labels)
        ((lp * w1).sum() + ((ent * w2).sum() if entropy else 0.0)).backward()

    def megatron():
        ce = vocab_parallel_cross_entropy(logits.float(), labels)
        (-(ce * w1)).sum().backward()

    reset, peak = _peak_tracker(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    for name, fn in (("megatron_ce", megatron), ("ours_lp", lambda: ours(False)),
                     ("ours_lp_entropy", lambda: ours(True))):
        logits.grad = None
        fn()                               # warm-up (kernels, allocator)
        logits.grad = None
        before = reset()
        times = []
        for _ in range(repeats):
            logits.grad = None
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        out[name] = {"seconds": min(times), "extra_gib": (peak() - before) / 2**30}
    base = out["megatron_ce"]
    for name in ("ours_lp", "ours_lp_entropy"):
        out[name]["time_vs_megatron"] = out[name]["seconds"] / base["seconds"]
        out[name]["mem_vs_megatron"] = out[name]["extra_gib"] / max(base["extra_gib"], 1e-9)
    return {"tokens": tokens, "vocab": vocab, "logits_gib": tokens * vocab * 2 / 2**30, **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--vocab", type=int, default=QWEN3_VOCAB)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()

    import os

    import torch.distributed as dist

    from megatron_rl.parallel.config import Layout
    from megatron_rl.parallel.launch import free_port
    from megatron_rl.runtime.parallel_init import destroy_megatron_parallel, init_megatron_parallel

    gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl" if gpu else "gloo", rank=0, world_size=1)
    init_megatron_parallel(Layout(), seed=0)   # Megatron's loss reads its TP group
    rows = [measure(t, a.vocab, a.repeats, device) for t in a.tokens]
    destroy_megatron_parallel()
    dist.destroy_process_group()
    name = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"device={name} vocab={a.vocab} bf16 logits, TP 1; ratios against Megatron's CE")
    print(f"{'tokens':>7s} {'path':16s} {'seconds':>8s} {'extra GiB':>9s} {'time/Meg':>8s} {'mem/Meg':>8s}")
    for r in rows:
        for k in ("megatron_ce", "ours_lp", "ours_lp_entropy"):
            v = r[k]
            print(f"{r['tokens']:7d} {k:16s} {v['seconds']:8.4f} {v['extra_gib']:9.2f} "
                  f"{v.get('time_vs_megatron', 1.0):8.2f} {v.get('mem_vs_megatron', 1.0):8.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
