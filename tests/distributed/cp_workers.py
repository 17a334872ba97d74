"""Context-parallel attention alone, in gloo processes, against a brute-force single-process
reference (float64 loops over sequences and heads).

Every rank builds the same full q / k / v and output weights from a seed, keeps its zigzag share
(``parallel.cp_layout``), runs ``context_parallel_attention`` and the loss ``sum(out * w)``
backward; the outputs and the q / k / v gradients are gathered over the CP group, un-sharded and
compared with the reference. The same spawn runs the two mutations the test must catch: an
identity backward on the K/V all-gather, and a causal mask by local instead of global position.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron_rl.parallel import collectives
from megatron_rl.parallel.cp_layout import bshd_shard, bshd_unshard, thd_shard, thd_unshard

NP, NG, HK, HV = 4, 2, 8, 6          # query heads, K/V groups (GQA), key and value head dims
THD_LENS = [13, 5, 22, 1, 8]         # uneven packed lengths (padded to a multiple of 8)
BSHD_B, BSHD_S = 2, 24


def reference_attention(q, k, v, seq_lens: List[int]):
    """``q[t, b, np, hk]`` etc.; causal within each sequence of ``seq_lens`` along dim 0."""
    out = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=q.dtype)
    rep = q.shape[2] // k.shape[2]
    start = 0
    for n in seq_lens:
        for b in range(q.shape[1]):
            for h in range(q.shape[2]):
                qs, ks, vs = q[start:start + n, b, h], k[start:start + n, b, h // rep], v[start:start + n, b, h // rep]
                scores = qs @ ks.T / HK ** 0.5
                causal = torch.ones(n, n, dtype=torch.bool).tril()
                p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
                out[start:start + n, b, h] = p @ vs
        start += n
    return out


def _inputs(layout: str, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    if layout == "bshd":
        shape, lens = (BSHD_S, BSHD_B), [BSHD_S]
    else:
        lens = [-(-n // 8) * 8 for n in THD_LENS]
        shape = (sum(lens), 1)
    mk = lambda *s: torch.randn(*shape, *s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return dict(q=mk(NP, HK), k=mk(NG, HK), v=mk(NG, HV), w=mk(NP, HV)), lens


def _shard(x, layout, lens, cp, rank):
    if layout == "bshd":
        return bshd_shard(x, cp, rank, dim=0)
    cu = [0] + torch.tensor(lens).cumsum(0).tolist()
    return thd_shard(x, cu, cp, rank, dim=0)


def _unshard(parts, layout, lens):
    if layout == "bshd":
        return bshd_unshard(parts, dim=0)
    return thd_unshard(parts, [0] + torch.tensor(lens).cumsum(0).tolist(), dim=0)


def _gather(x, group, cp):
    parts = [torch.empty_like(x) for _ in range(cp)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def _one_case(layout, dtype, cp, group, cp_rank, method="auto") -> Dict[str, float]:
    from megatron_rl.model.attention import context_parallel_attention

    full, lens = _inputs(layout, dtype, seed=7)
    ref_leaves = {k: full[k].double().clone().requires_grad_() for k in "qkv"}
    ref = reference_attention(ref_leaves["q"], ref_leaves["k"], ref_leaves["v"], lens)
    (ref * full["w"].double()).sum().backward()
    local = {k: _shard(v, layout, lens, cp, cp_rank) for k, v in full.items()}
    leaves = {k: local[k].clone().requires_grad_() for k in "qkv"}
    out = context_parallel_attention(leaves["q"], leaves["k"], leaves["v"], cp_group=group,
                                     seq_lens=lens, scale=HK ** -0.5, method=method)
    (out * local["w"]).sum().backward()
    errs = {"out": (_unshard(_gather(out.detach(), group, cp), layout, lens).double() - ref.detach())}
    for k in "qkv":
        got = _unshard(_gather(leaves[k].grad, group, cp), layout, lens).double()
        errs[f"d{k}"] = got - ref_leaves[k].grad
    return {name: float(e.abs().max()) for name, e in errs.items()}


@contextlib.contextmanager
def _mutation(name: str):
    """Break one part of the CP attention on purpose (the test must then fail)."""
    import megatron_rl.model.attention as A

    if name == "identity_backward":
        orig = collectives._AllGatherPartial.backward

        def identity(ctx, grad):       # keep this rank's slice of its own gradient, no sum
            p, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
            n = grad.shape[ctx.dim] // p
            return grad.narrow(ctx.dim, r * n, n).contiguous(), None, None

        collectives._AllGatherPartial.backward = staticmethod(identity)
        try:
            yield
        finally:
            collectives._AllGatherPartial.backward = orig
    elif name == "local_mask":
        orig = A._plan

        def local_positions(seq_lens, cp_size, cp_rank):  # each chunk as if it were the sequence
            return [A._Slice(s.q_start, s.q_len, s.k_start + s.k_len - s.q_len, s.q_len)
                    for s in orig(seq_lens, cp_size, cp_rank)]

        A._plan = local_positions
        try:
            yield
        finally:
            A._plan = orig
    elif name == "part_lse_backward":
        from megatron_rl.model import block_attention as BA

        orig = BA._CpuPrefixDiagonal.backward

        def part_stats(ctx, grad_out):  # each part's backward with its own softmax, not the merged
            q, kp, vp, kd, vd, _, _ = ctx.saved_tensors
            od, ld = BA._cpu_flash(q, kd, vd, 0.0, True, scale=ctx.scale)
            dq, dkd, dvd = BA._cpu_flash_backward(grad_out, q, kd, vd, od, ld, 0.0, True,
                                                  scale=ctx.scale)
            dkp, dvp = torch.zeros_like(kp), torch.zeros_like(vp)
            if kp.shape[2]:
                op, lp = BA._cpu_flash(q, kp, vp, 0.0, False, scale=ctx.scale)
                dq1, dkp, dvp = BA._cpu_flash_backward(grad_out, q, kp, vp, op, lp, 0.0, False,
                                                       scale=ctx.scale)
                dq = dq + dq1
            return dq, dkp, dvp, dkd, dvd, None

        BA._CpuPrefixDiagonal.backward = staticmethod(part_stats)
        try:
            yield
        finally:
            BA._CpuPrefixDiagonal.backward = orig
    elif name.startswith("ring_"):
        with _ring_mutation(name):
            yield
    else:
        raise KeyError(name)


@contextlib.contextmanager
def _ring_mutation(name: str):
    """The ring's three ways to go wrong: the K/V gradients kept where they were computed (the
    last hop home skipped), causality by local chunk slot instead of global chunk, and each
    block's backward with its own softmax statistics instead of the merged ones."""
    from megatron_rl.model import ring_attention as RA

    if name == "ring_grads_not_sent_home":
        orig = RA._send_home
        RA._send_home = lambda dkv, group: dkv
        try:
            yield
        finally:
            RA._send_home = orig
    elif name == "ring_local_mask":
        orig = RA.ring_blocks

        def local_slots(seq_lens, cp, rank, src):   # every held chunk as if it were one's own
            return [b._replace(causal=True) for b in orig(seq_lens, cp, rank, rank)]

        RA.ring_blocks = local_slots
        try:
            yield
        finally:
            RA.ring_blocks = orig
    else:
        orig = RA._cpu_flash_backward

        def block_stats(grad_out, q, k, v, out, lse, dropout, causal, scale):
            o, l = RA._cpu_flash(q, k, v, 0.0, causal, scale=scale)[:2]
            return orig(grad_out, q, k, v, o, l, dropout, causal, scale=scale)

        RA._cpu_flash_backward = block_stats
        try:
            yield
        finally:
            RA._cpu_flash_backward = orig


CASES = [(layout, dtype, cp, method) for layout in ("bshd", "thd")
         for dtype in ("float64", "float32") for cp in (2, 4) for method in ("ring", "all_gather")]
# the all-gather path's mutants, then the ring's (``ring_*``)
MUTATIONS = [("identity_backward", "bshd", 2), ("identity_backward", "thd", 4),
             ("local_mask", "bshd", 4), ("local_mask", "thd", 2),
             ("part_lse_backward", "bshd", 2), ("part_lse_backward", "thd", 4),
             ("ring_grads_not_sent_home", "bshd", 2), ("ring_grads_not_sent_home", "thd", 4),
             ("ring_local_mask", "bshd", 4), ("ring_local_mask", "thd", 2),
             ("ring_block_lse_backward", "bshd", 2), ("ring_block_lse_backward", "thd", 4)]


def cp_attention_equivalence(rank: int, world: int) -> dict:
    """World 4: CP 2 (two groups side by side) and CP 4."""
    torch.manual_seed(0)
    groups = {2: [dist.new_group([0, 1]), dist.new_group([2, 3])], 4: [dist.group.WORLD]}

    def run(layout, dtype, cp, method):
        group = groups[cp][rank // cp]
        return _one_case(layout, getattr(torch, dtype), cp, group, dist.get_rank(group), method)

    out = {f"{layout}_{dtype}_cp{cp}_{method}": run(layout, dtype, cp, method)
           for layout, dtype, cp, method in CASES}
    for name, layout, cp in MUTATIONS:
        with _mutation(name):
            method = "ring" if name.startswith("ring_") else "all_gather"
            out[f"mutant_{name}_{layout}_cp{cp}"] = run(layout, "float64", cp, method)
    return out
