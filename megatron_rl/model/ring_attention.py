"""Context-parallel attention as a ring (CPU, no dropout): no rank ever holds more than its own
K/V and one other rank's, so the attention's memory per rank falls as ``1 / cp``.

Legend: ``b`` rows (BSHD sequences; 1 for a packed THD stream), ``h`` query heads, ``g`` K/V
groups, ``n`` this rank's tokens (its two zigzag chunks of every sequence, ``parallel.cp_layout``:
chunk ``i`` then chunk ``2cp - 1 - i``, sequence after sequence), ``d`` the head dim (keys and
values padded to one width by the caller).

Forward: at ring step ``t`` a rank holds the K/V of rank ``src = rank - t`` (its own at ``t = 0``)
and sends it on to ``rank + 1`` while it computes. Its query chunk ``a`` sees the held key chunk
``b`` in full when ``b < a`` (earlier positions), causally when ``b == a`` (its own diagonal,
``t = 0``) and not at all when ``b > a``; each block is one call of SDPA's flash kernel for CPU,
which returns the block's output and log-sum-exp, merged exactly into the rows' running output
and log-sum-exp (``o = sum_k o_k exp(lse_k - lse)``). Saved: this rank's q, k, v, the merged
output and log-sum-exp.

Backward (convention: each rank's ``dq`` is its own; the ``dk`` / ``dv`` of a rank's keys are the
sum over every rank whose queries saw them, carried home by the ring): the K/V travel the ring
again, now with a ``dK/dV`` accumulator beside them. Each block's flash backward, given the
*merged* output and log-sum-exp, yields exactly its share of the whole softmax's gradient (as in
``model.block_attention``): ``dq`` adds locally, ``dk`` / ``dv`` add to the travelling
accumulator, and after the last step one more hop brings every accumulator to the rank that owns
those keys. Compute per rank is ``(2cp + 1) / (2cp)`` of a balanced causal split, as the
all-gather path's; the exchange overlaps the blocks of each step.
"""

from __future__ import annotations

from typing import List, NamedTuple, Sequence

import torch

from megatron_rl.parallel.collectives import Group, group_rank, group_size, RingShift
from megatron_rl.parallel.cp_layout import chunk_ids

Tensor = torch.Tensor

_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class Block(NamedTuple):
    """Query rows ``[q0, q0 + c)`` over held key rows ``[k0, k0 + c)``, causal or in full."""
    q0: int
    k0: int
    c: int
    causal: bool


def ring_blocks(seq_lens: Sequence[int], cp: int, rank: int, src: int) -> List[Block]:
    """The blocks rank ``rank`` computes while it holds rank ``src``'s K/V: for every sequence,
    its query chunk ``a`` against the held key chunk ``b <= a`` (causal when equal)."""
    out, off = [], 0
    for L in seq_lens:
        c = L // (2 * cp)
        if c:
            for qa, a in enumerate(chunk_ids(cp, rank)):
                for kb, b in enumerate(chunk_ids(cp, src)):
                    if b <= a:
                        out.append(Block(off + qa * c, off + kb * c, c, b == a))
        off += 2 * c
    return out


def _merge_into(out: Tensor, lse: Tensor, q0: int, c: int, o: Tensor, lse_b: Tensor) -> None:
    """Rows ``[q0, q0 + c)`` of the running ``out`` / ``lse`` merged with a block's, in place."""
    rows = slice(q0, q0 + c)
    new = torch.logaddexp(lse[:, :, rows], lse_b.to(lse.dtype))
    out[:, :, rows] = (out[:, :, rows] * (lse[:, :, rows] - new).exp().unsqueeze(-1)
                       + o.to(out.dtype) * (lse_b.to(lse.dtype) - new).exp().unsqueeze(-1))
    lse[:, :, rows] = new


class _RingAttention(torch.autograd.Function):
    """``q[b, h, n, d]``, ``k / v[b, g, n, d]`` -> ``[b, h, n, d]`` (see the module doc)."""

    @staticmethod
    def forward(ctx, q, k, v, group, seq_lens, scale):
        """The ring's forward: blocks merged by log-sum-exp while the K/V travel."""
        cp, rank = group_size(group), group_rank(group)
        acc = torch.promote_types(q.dtype, torch.float32)
        out = q.new_zeros(*q.shape[:3], v.shape[-1], dtype=acc)
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=acc)
        held = torch.stack([k, v])                                    # [2, b, g, n, d]
        for t in range(cp):
            shift = RingShift(held, group) if t < cp - 1 else None
            for blk in ring_blocks(seq_lens, cp, rank, (rank - t) % cp):
                keys = slice(blk.k0, blk.k0 + blk.c)
                o, l = _cpu_flash(q[:, :, blk.q0:blk.q0 + blk.c], held[0][:, :, keys],
                                  held[1][:, :, keys], 0.0, blk.causal, scale=scale)[:2]
                _merge_into(out, lse, blk.q0, blk.c, o, l)
            if shift is not None:
                held = shift.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.seq_lens, ctx.scale = group, list(seq_lens), scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        """The ring again, with the K/V gradients travelling beside the K/V and sent home. The
        four travellers move one at a time (one in flight beside the four held), and ``grad_out``
        is read block by block: the peak holds no whole-size copy the algorithm does not need."""
        q, k, v, out, lse = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        cp, rank = group_size(group), group_rank(group)
        dq = torch.zeros_like(q)
        held = [k, v, torch.zeros_like(k), torch.zeros_like(v)]   # keys, values, their grads
        for t in range(cp):
            hk, hv, dk, dv = held
            for blk in ring_blocks(ctx.seq_lens, cp, rank, (rank - t) % cp):
                rows, keys = slice(blk.q0, blk.q0 + blk.c), slice(blk.k0, blk.k0 + blk.c)
                dqb, dkb, dvb = _cpu_flash_backward(
                    grad_out[:, :, rows].contiguous(), q[:, :, rows].contiguous(),
                    hk[:, :, keys].contiguous(), hv[:, :, keys].contiguous(),
                    out[:, :, rows].contiguous(), lse[:, :, rows].contiguous(), 0.0, blk.causal,
                    scale=scale)
                dq[:, :, rows] += dqb
                dk[:, :, keys] += dkb
                dv[:, :, keys] += dvb
            if t < cp - 1:
                held = [RingShift(x, group).wait() for x in held]
        dk, dv = (_send_home(x, group) for x in held[2:])
        return dq, dk, dv, None, None, None


def _send_home(dkv: Tensor, group: Group) -> Tensor:
    """The last hop: after ``cp`` steps a rank holds the K/V gradients of the next rank's keys."""
    return RingShift(dkv, group).wait()


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group: Group, seq_lens: Sequence[int],
                   scale) -> Tensor:
    """Causal attention of this CP rank's ``q[b, h, n, hk]`` over whole sequences, ``k[b, g, n,
    hk]``, ``v[b, g, n, hv]`` exchanged around the ring (CPU, no dropout). Returns
    ``[b, h, n, hv]``."""
    hk, hv = q.shape[-1], v.shape[-1]
    if scale is None:
        scale = hk ** -0.5
    if hk != hv:      # the CPU kernel wants one head size: zero columns change no score or output
        width = max(hk, hv)
        q, k, v = (torch.nn.functional.pad(x, (0, width - x.shape[-1])) for x in (q, k, v))
    return _RingAttention.apply(q, k, v, group, tuple(seq_lens), scale)[..., :hv]
