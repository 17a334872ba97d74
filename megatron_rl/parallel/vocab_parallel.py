"""Per-token log-prob of the target and entropy, from logits sharded over the vocabulary (TP).

Legend: ``N`` tokens, ``Vs`` this rank's vocabulary shard (``[vocab_start, vocab_start + Vs)``).
With ``z`` the logits of one token, ``m`` their max over the full vocabulary, ``S = sum exp(z-m)``
and ``p = exp(z-m)/S``:
    lp = z_target - m - log S,     H = log S - E_p[z - m]
Forward: two collectives over TP for the whole batch, whatever the chunking: an all-reduce MAX of
``m`` ``[N]`` and one all-reduce SUM of ``(S, S*E_p[z-m], z_target-m)`` ``[N, 3]``. Backward is
local (no collective), per chunk of tokens, recomputing ``p``:
    dL/dz = g_lp * (onehot(target) - p) + g_H * p * (E_p[z] - z)
The loss built on ``lp`` and ``H`` is TP-replicated (every TP rank computes it from the same
reduced values), so the local gradient is exact; nothing is multiplied by the TP size.

Memory: the logits (any float dtype, e.g. bf16) are never copied whole nor modified in place; the
math runs in fp32 (fp64 for fp64 logits) on chunks of ``chunk_tokens`` tokens, at most two
``[chunk, Vs]`` fp32 buffers at a time; the gradient is written chunk by chunk into one tensor of
the logits' dtype. Peak extra memory is therefore the gradient plus ``2 * chunk * Vs * 4`` bytes.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megatron_rl.parallel.collectives import Group, all_reduce_nograd

Tensor = torch.Tensor

MAX_CHUNK_BYTES = 128 * 2**20  # per fp32 working buffer; two are live at a time
MIN_CHUNK_BYTES = 4 * 2**20    # below this the per-chunk overhead shows


def default_chunk_tokens(num_tokens: int, vocab_shard: int) -> int:
    """About 1/64 of the tokens, so the two fp32 buffers stay near 1/8 of the bf16 logits, within
    [4 MiB, 128 MiB] per buffer."""
    row = 4 * max(vocab_shard, 1)
    lo, hi = max(1, MIN_CHUNK_BYTES // row), max(1, MAX_CHUNK_BYTES // row)
    return min(max(num_tokens // 64, lo), hi)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shifted(logits: Tensor, rows: slice, m: Tensor, buf: Tensor) -> Tensor:
    """``logits[rows] - m`` in the math dtype, written into (a prefix of) our buffer."""
    z = buf[: rows.stop - rows.start]
    z.copy_(logits[rows])
    return z.sub_(m[rows, None])


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, group: Group, vocab_start: int, chunk: int):
        """Log-prob of each target and the entropy from vocab-sharded logits: two all-reduces over
        TP (the max, then the stacked sums)."""
        N, Vs = logits.shape
        md = _math_dtype(logits.dtype)
        local_t = targets - vocab_start
        here = (local_t >= 0) & (local_t < Vs)
        local_t = torch.where(here, local_t, torch.zeros_like(local_t))
        m = all_reduce_nograd(logits.amax(-1).to(md), group, dist.ReduceOp.MAX)   # [N]
        sums = torch.empty(N, 3, dtype=md, device=logits.device)  # S, sum e*(z-m), z_t - m
        # two working buffers reused by every chunk: fresh large allocations would page-fault
        # (and zero) their memory on every chunk
        bufs = torch.empty(2, min(chunk, N), Vs, dtype=md, device=logits.device)
        for s in range(0, N, chunk):
            e = slice(s, min(s + chunk, N))
            z = _shifted(logits, e, m, bufs[0])
            ex = torch.exp(z, out=bufs[1, : z.shape[0]])
            sums[e, 0] = ex.sum(-1)
            sums[e, 2] = torch.where(here[e], z.gather(1, local_t[e, None]).squeeze(1),
                                     torch.zeros_like(m[e]))
            # sum(e^z * z) by torch's pairwise reduction: a dot product (bmm) accumulates 1e5+
            # terms in one running fp32 sum, which made the entropy ~20x less precise than a
            # plain fp32 log_softmax entropy at V = 151,936
            sums[e, 1] = z.mul_(ex).sum(-1)
        del bufs
        sums = all_reduce_nograd(sums, group)
        log_s = sums[:, 0].log()
        ez = sums[:, 1] / sums[:, 0]                                  # E_p[z - m]
        lp = sums[:, 2] - log_s
        ent = log_s - ez
        ctx.save_for_backward(logits, local_t, here, m, log_s, ez)
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp: Optional[Tensor], g_ent: Optional[Tensor]):
        """Local: ``g_lp (onehot - p) + g_ent p (E_p z - z)``, chunked over tokens."""
        logits, local_t, here, m, log_s, ez = ctx.saved_tensors
        N, Vs = logits.shape
        grad = torch.empty_like(logits)
        bufs = torch.empty(2, min(ctx.chunk, N), Vs, dtype=m.dtype, device=logits.device)
        for s in range(0, N, ctx.chunk):
            e = slice(s, min(s + ctx.chunk, N))
            z = _shifted(logits, e, m, bufs[0])                       # z - m
            p = torch.sub(z, log_s[e, None], out=bufs[1, : z.shape[0]]).exp_()
            # coefficient of p: g_H * (E_p[z] - z) - g_lp, built in z's buffer
            if g_ent is not None:
                z.neg_().add_(ez[e, None]).mul_(g_ent[e, None].to(m.dtype))
            else:
                z.zero_()
            if g_lp is not None:
                z.sub_(g_lp[e, None].to(m.dtype))
            z.mul_(p)
            if g_lp is not None:
                onehot = torch.where(here[e], g_lp[e].to(m.dtype), torch.zeros_like(m[e]))
                z.scatter_add_(1, local_t[e, None], onehot[:, None])
            grad[e] = z
        return grad, None, None, None, None


def vocab_parallel_logprobs(
    logits: Tensor, targets: Tensor, *, tp_group: Group = None, vocab_start: int = 0,
    chunk_tokens: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """``(logprobs, entropy)`` of shape ``targets.shape`` (fp32; fp64 for fp64 logits).

    ``logits[..., Vs]`` this rank's vocabulary shard, starting at global id ``vocab_start``;
    ``targets[...]`` global token ids (ids outside ``[0, V)``, e.g. -100 on padding, give a finite
    log-prob that the loss mask must drop). ``chunk_tokens`` bounds the fp32 working set (default:
    ``default_chunk_tokens``). Every rank of ``tp_group`` must call this with the same ``N`` tokens.
    """
    Vs = logits.shape[-1]
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                         "disagree: logits must be targets.shape + (vocab shard,)")
    chunk = chunk_tokens or default_chunk_tokens(targets.numel(), Vs)
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    lp, ent = _VocabParallelLogprobEntropy.apply(
        logits.reshape(-1, Vs), targets.reshape(-1).long(), tp_group, vocab_start, chunk)
    return lp.view(targets.shape), ent.view(targets.shape)
