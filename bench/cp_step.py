"""Context parallelism on CPU: per-rank peak memory and time of one RL training step of the tiny
MoE, and of the CP attention alone, at CP 1 / 2 / 4 for responses of 1k, 4k and 8k tokens.

    python bench/cp_step.py                         # both tables, lengths 1024 4096 8192
    python bench/cp_step.py --what attention --lengths 4096 --cp 1 2

Every (CP, length) runs in fresh gloo processes, one thread each. Peak memory is the rank's
resident-set high-water mark over the measured work alone (Linux ``VmHWM``, reset just before it
through ``/proc/self/clear_refs``), minus the resident set just before: what the step adds. The CP
attention's per-micro-batch masks are rebuilt in every measured call, as for a new micro-batch.
Time is the mean of two steps after a warm-up. The baseline is CP 1 in the same run: every row
prints its memory and time as a ratio to it. CP ranks beyond the machine's cores share them, so
wall time at CP 4 on 2 cores measures contention as much as the split; memory does not depend on it.

step:      tiny Qwen3-MoE (hidden 64, 2 layers, 4 experts top-2, vocab 256, fp32), 2 sequences of a
           128-token prompt + the response (BSHD), GSPO loss, forward + backward + distributed
           optimizer through Megatron's schedule.
attention: the core attention alone, 4 query heads / 2 K/V groups of 32, forward + backward of
           one sequence: CP 1 is SDPA's causal kernel, CP > 1 the ring (``model.ring_attention``,
           CPU's path); ``attention_ag`` rows: the all-gather path (no masks), for comparison.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron_rl.parallel.launch import free_port
from peak_rss import reset_high_water, rss_kb   # bench/, the script's own directory

PROMPT, BATCH = 128, 2


def _measured(fn, repeats: int = 2):
    """``(extra peak MiB, seconds per call)`` of ``fn`` after one warm-up call."""
    fn()
    before = reset_high_water()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    seconds = (time.perf_counter() - t0) / repeats
    return (rss_kb("VmHWM") - before) / 1024, seconds


def _step_case(L: int, cp: int):
    import megatron_rl.model.attention as A
    from megatron_rl.model.build import ModelOptions
    from megatron_rl.model.hf_config import load_hf_config
    from megatron_rl.model.tiny import tiny_hf_config
    from megatron_rl.parallel.config import Layout
    from megatron_rl.parallel.loss import step_denominators
    from megatron_rl.train.batches import build_micro_batch
    from megatron_rl.train.megatron_loss import PolicyLoss, train_forward_backward
    from megatron_rl.runtime.model_setup import build_model
    from megatron_rl.train.optimizer import (OptimSettings, build_optimizer, nonfinite_flag,
                                             optimizer_step)
    from megatron_rl.runtime.parallel_init import init_megatron_parallel

    hf = load_hf_config(tiny_hf_config("qwen3_moe"))
    groups = init_megatron_parallel(Layout(cp=cp), seed=0)
    model, _ = build_model(hf, Layout(cp=cp), ModelOptions(), distributed_optimizer=True)
    opt, sched = build_optimizer(model, OptimSettings(lr=1e-4), torch.float32)
    g = torch.Generator().manual_seed(0)
    n = PROMPT + L
    seqs = [{"tokens": torch.randint(0, hf.vocab_size, (n,), generator=g),
             "loss_mask": (torch.arange(n) >= PROMPT).float(),
             "old_logprobs": -torch.rand(n, generator=g) - 3, "advantages": torch.randn(n, generator=g)}
            for _ in range(BATCH)]
    mb = build_micro_batch(seqs, torch.zeros(BATCH, dtype=torch.long), packed=False, cp_size=cp,
                           cp_rank=groups.cp_rank, cp_group=groups.cp)
    tokens, nseq = step_denominators([mb.shard], groups.dp_cp)
    loss = PolicyLoss("gspo", {"eps_low": 0.2, "eps_high": 0.2}, tokens, nseq)

    def step():
        A._Layout.key = None   # CP attention masks built in every step, as for a new micro-batch
        model[0].zero_grad_buffer()
        train_forward_backward(model, [mb], loss, groups)
        optimizer_step(opt, sched, nonfinite_flag(model, []), dist.group.WORLD)

    return step


def _attention_case(L: int, cp: int, method: str = "ring"):
    import megatron_rl.model.attention as A
    from megatron_rl.model.attention import context_parallel_attention
    from megatron_rl.parallel.cp_layout import bshd_shard

    S = -(-(PROMPT + L) // (2 * cp)) * 2 * cp
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(S, 1, h, 32, generator=g) for h in (4, 2, 2))
    rank = dist.get_rank()
    q, k, v = (bshd_shard(x, cp, rank, dim=0).requires_grad_() for x in (q, k, v))
    group = dist.group.WORLD if cp > 1 else None

    def run():
        A._Layout.key = None   # build the masks in every call, as for a new micro-batch
        if cp == 1:   # SDPAttention's CP 1 path: SDPA's causal kernel
            out = F.scaled_dot_product_attention(*(x.permute(1, 2, 0, 3) for x in (q, k, v)),
                                                 is_causal=True, enable_gqa=True)
        else:
            out = context_parallel_attention(q, k, v, cp_group=group,
                                             seq_lens=[S], method=method)
        out.sum().backward()

    return run


def _worker(rank, world, port, what, L, out):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    if what == "step":
        fn = _step_case(L, world)
    else:   # attention: the ring; attention_ag: the all-gather path
        fn = _attention_case(L, world, "all_gather" if what == "attention_ag" else "ring")
    mem, seconds = _measured(fn)
    peaks = [None] * world
    dist.all_gather_object(peaks, (mem, seconds))
    if rank == 0:
        out.append((max(m for m, _ in peaks), max(s for _, s in peaks)))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=("step", "attention", "attention_ag", "both"), default="both",
                   help="attention: the ring (CPU's path); attention_ag: the all-gather path")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cps = sorted(set(a.cp) | {1})
    print(f"cpus={os.cpu_count()} torch={torch.__version__} prompt={PROMPT} batch={BATCH} (step)")
    print(f"{'what':12s} {'resp len':>8s} {'CP':>2s} {'peak MiB/rank':>13s} {'s/step':>8s} "
          f"{'mem / CP1':>9s} {'time / CP1':>10s}")
    for what in (("step", "attention", "attention_ag") if a.what == "both" else (a.what,)):
        for L in a.lengths:
            base = None
            for cp in cps:
                with mp.Manager() as m:
                    out = m.list()
                    mp.spawn(_worker, args=(cp, free_port(), what, L, out), nprocs=cp, join=True)
                    mem, sec = out[0]
                base = base or (mem, sec)
                print(f"{what:12s} {L:8d} {cp:2d} {mem:13.1f} {sec:8.3f} {mem / base[0]:9.2f} "
                      f"{sec / base[1]:10.2f}", flush=True)


if __name__ == "__main__":
    main()
