"""One RL training step of a Megatron-Core MoE: tokens/s and MFU, our loss vs Megatron's own.

    python bench/moe_step.py --size 1.9b            # on one GPU, bf16, SDPA (or TE) layer spec
    python bench/moe_step.py --size tiny --steps 3  # CPU smoke run (fp32)

The model is a Qwen3-MoE-shaped config (``--size``), built by ``model.build`` with random weights.
Each timed step is forward + backward over ``--micro-batches`` micro-batches of ``--seqs``
sequences x ``--seq-len`` tokens through Megatron's schedule, then the optimizer step. Two losses
run in the same process on the same model:

- baseline: Megatron's ``vocab_parallel_cross_entropy`` (what supervised training costs);
- ours: the GSPO loss through ``train.megatron_loss`` (fused log-prob + entropy, sequence ratios).

Printed: tokens/s for each, the ratio ours/baseline, and MFU = 6 x active parameters x tokens/s
(+ causal attention FLOPs) / peak. Active parameters count the routed experts a token uses
(top-k of them), the shared parts and the output layer; the input embedding is a lookup. Peak:
``--peak-tflops`` (default 989, H100/H200 dense bf16; CPU runs print no MFU).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

SIZES = {
    # ~1.9B total, ~0.40B active: 16 experts, top-2 (the "1-2B MoE, 16 experts, top-2")
    "1.9b": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=12, num_attention_heads=16,
                 num_key_value_heads=4, head_dim=128, moe_intermediate_size=1408,
                 num_experts=16, num_experts_per_tok=2, max_position_embeddings=8192),
    "tiny": dict(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, moe_intermediate_size=128,
                 num_experts=8, num_experts_per_tok=2, max_position_embeddings=1024),
}


def active_params(c) -> int:
    """Per-token multiply-accumulate parameters (no input embedding: it is a lookup)."""
    h, L, hd = c["hidden_size"], c["num_hidden_layers"], c["head_dim"]
    attn = h * hd * (c["num_attention_heads"] * 2 + c["num_key_value_heads"] * 2)
    experts = c["num_experts_per_tok"] * 3 * h * c["moe_intermediate_size"] + h * c["num_experts"]
    return L * (attn + experts) + h * c["vocab_size"]


def step_flops(c, tokens: int, seq_len: int) -> float:
    """Training FLOPs: 6 per active parameter per token, plus causal attention (QK^T and AV: 2
    matmuls x 2 FLOPs x 3 for fwd+bwd, half the square for the causal mask)."""
    attn = 6 * c["num_hidden_layers"] * c["num_attention_heads"] * c["head_dim"] * seq_len * tokens
    return 6.0 * active_params(c) * tokens + attn


def _batches(args, vocab, device):
    from megatron_rl.train.batches import build_micro_batch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.micro_batches):
        seqs = []
        for _ in range(args.seqs):
            n = args.seq_len
            mask = (torch.arange(n) >= n // 4).float()  # a quarter prompt, the rest response
            seqs.append({"tokens": torch.randint(0, vocab, (n,), generator=g), "loss_mask": mask,
                         "old_logprobs": -torch.rand(n, generator=g) - 1.0,
                         "advantages": torch.randn(n, generator=g)})
        ids = torch.arange(args.seqs) // max(1, args.seqs // 2)
        out.append(build_micro_batch(seqs, ids, packed=False, device=device))
    return out


def _ce_step(model, mbs):
    """Megatron's own loss through the same schedule: the supervised baseline."""
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    def loss_func(mb, logits):
        loss = vocab_parallel_cross_entropy(logits.float(), mb.labels).mean()
        return loss, {"loss": loss.detach()}

    def step(data, m):
        mb = next(data)
        out = m(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=None)
        return out, partial(loss_func, mb)

    b, s = mbs[0].tokens.shape
    get_forward_backward_func()(forward_step_func=step, data_iterator=iter(mbs), model=model,
                                num_microbatches=len(mbs), forward_only=False, seq_length=s,
                                micro_batch_size=b)


def _time(fn, steps, sync):
    fn()
    sync()  # warm-up step: allocator, kernels
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1.9b")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--seqs", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from megatron_rl.model.build import ModelOptions
    from megatron_rl.model.hf_config import load_hf_config
    from megatron_rl.model.tiny import tiny_hf_config
    from megatron_rl.parallel.config import Layout
    from megatron_rl.parallel.loss import step_denominators
    from megatron_rl.train.megatron_loss import PolicyLoss, train_forward_backward
    from megatron_rl.runtime.model_setup import build_model
    from megatron_rl.train.optimizer import OptimSettings, build_optimizer, nonfinite_flag, optimizer_step
    from megatron_rl.runtime.parallel_init import init_megatron_parallel

    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if gpu else "gloo", rank=0, world_size=1)
    dtype = torch.bfloat16 if gpu else torch.float32
    cfg = tiny_hf_config("qwen3_moe", **SIZES[args.size])
    hf = load_hf_config(cfg)
    groups = init_megatron_parallel(Layout(), seed=1)
    model, _ = build_model(hf, Layout(), ModelOptions(params_dtype=dtype), distributed_optimizer=True)
    opt, sched = build_optimizer(model, OptimSettings(lr=1e-6), dtype)
    mbs = _batches(args, hf.vocab_size, "cuda" if gpu else "cpu")
    nt, ns = step_denominators([m.shard for m in mbs], groups.dp_cp)
    ours_loss = PolicyLoss("gspo", {"eps_low": 3e-4, "eps_high": 4e-4}, nt, ns)
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def run(kind):
        def once():
            model[0].zero_grad_buffer()
            opt.zero_grad()
            if kind == "ours":
                train_forward_backward(model, mbs, ours_loss, groups)
            else:
                _ce_step(model, mbs)
            optimizer_step(opt, sched, nonfinite_flag(model, []), torch.distributed.group.WORLD)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        sec = _time(once, args.steps, sync)
        peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
        return sec, peak

    tokens = args.micro_batches * args.seqs * args.seq_len
    res = {"device": torch.cuda.get_device_name() if gpu else "cpu", "size": args.size,
           "active_params": active_params(cfg), "tokens_per_step": tokens,
           "total_params": sum(p.numel() for p in model[0].parameters())}
    for kind in ("baseline", "ours"):
        sec, peak = run(kind)
        flops = step_flops(cfg, tokens, args.seq_len)
        res[kind] = {"step_s": sec, "tokens_per_s": tokens / sec, "peak_gib": peak,
                     "mfu": flops / sec / (args.peak_tflops * 1e12) if gpu else None}
    res["ours_over_baseline_time"] = res["ours"]["step_s"] / res["baseline"]["step_s"]
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
