"""One context-parallel attention block without a mask: a query chunk over the keys before it
(every one visible) and over its own diagonal block (causal), merged exactly.

Legend: ``b`` sequences, ``h`` query heads, ``g`` K/V groups (``h % g == 0``), ``c`` queries of the
chunk, ``p`` keys before it, ``d`` head dim. Chunk ``i`` of length ``c`` sees keys ``[0, i c)`` in
full and key ``i c + j`` from its query ``t >= j``: a lower-right causal ``[c, (i+1) c]`` block.

Two kernels, no ``S x S``-scale mask on either device:

* CPU: SDPA's flash kernel for CPU (``aten._scaled_dot_product_flash_attention_for_cpu``) returns
  each part's output and log-sum-exp; the parts merge as ``o = sum_k o_k exp(lse_k - lse)`` with
  ``lse = logaddexp(lse_1, lse_2)``. The backward runs each part's flash backward with the *merged*
  output and log-sum-exp (as ring attention does): the kernel forms ``P = exp(S - lse)`` and
  ``D = rowsum(dO * O)`` from them, which are exactly the part's rows of the whole softmax's
  gradient, so the two parts' ``dq`` add up and their ``dk``/``dv`` are the keys' own.
* CUDA: one SDPA call with ``torch.nn.attention.bias.causal_lower_right``, which the flash and
  memory-efficient kernels take natively (lower-right alignment), never materialised.

Dropout needs one random mask shared by forward and backward, which the CPU kernel pair does not
expose; with ``dropout_p > 0`` on CPU the caller keeps its masked path (``available``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

Tensor = torch.Tensor

_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def available(device: torch.device, dropout_p: float) -> bool:
    """Whether ``chunk_attention`` runs here without a mask (CUDA always; CPU without dropout)."""
    return device.type == "cuda" or (device.type == "cpu" and dropout_p == 0.0)


def _merge(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor):
    """Exact softmax merge of two disjoint key sets' outputs by their log-sum-exps (at fp32 or
    better: bf16 outputs are weighted in fp32, fp64 ones stay fp64)."""
    lse = torch.logaddexp(l1, l2)
    acc = torch.promote_types(o1.dtype, torch.float32)
    w1, w2 = ((l - lse).exp().unsqueeze(-1).to(acc) for l in (l1, l2))
    return (o1.to(acc) * w1 + o2.to(acc) * w2).to(o1.dtype), lse


class _CpuPrefixDiagonal(torch.autograd.Function):
    """``q[b, h, c, d]`` over ``k_prev/v_prev[b, g, p, d]`` (all visible, ``p`` may be 0) and
    ``k_diag/v_diag[b, g, c, d]`` (causal); returns ``[b, h, c, d]``."""

    @staticmethod
    def forward(ctx, q, k_prev, v_prev, k_diag, v_diag, scale):
        """Both parts' flash outputs and log-sum-exps, merged; saves the merged ones."""
        out, lse = _cpu_flash(q, k_diag, v_diag, 0.0, True, scale=scale)
        if k_prev.shape[2]:
            o1, l1 = _cpu_flash(q, k_prev, v_prev, 0.0, False, scale=scale)
            out, lse = _merge(o1, l1, out, lse)
        ctx.save_for_backward(q, k_prev, v_prev, k_diag, v_diag, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        """Each part's flash backward with the merged output and log-sum-exp; ``dq`` summed."""
        q, k_prev, v_prev, k_diag, v_diag, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk_diag, dv_diag = _cpu_flash_backward(grad_out, q, k_diag, v_diag, out, lse, 0.0,
                                                   True, scale=ctx.scale)
        if k_prev.shape[2]:
            dq1, dk_prev, dv_prev = _cpu_flash_backward(grad_out, q, k_prev, v_prev, out, lse, 0.0,
                                                        False, scale=ctx.scale)
            dq = dq + dq1
        else:
            dk_prev, dv_prev = torch.zeros_like(k_prev), torch.zeros_like(v_prev)
        return dq, dk_prev, dv_prev, dk_diag, dv_diag, None


def lower_right_sdpa(q: Tensor, k: Tensor, v: Tensor, *, scale, dropout_p: float = 0.0) -> Tensor:
    """SDPA with torch's lower-right causal bias: CUDA's flash / memory-efficient kernels take it
    without a mask (elsewhere torch materialises it, so CPU uses the merged kernels instead)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale,
                                          attn_mask=causal_lower_right(q.shape[2], k.shape[2]),
                                          enable_gqa=k.shape[1] != q.shape[1])


def chunk_attention(q: Tensor, k: Tensor, v: Tensor, *, scale, dropout_p: float = 0.0) -> Tensor:
    """``q[b, h, c, d]`` attending ``k/v[b, g, p + c, d]`` lower-right causally: every key before
    the last ``c`` is visible, the last ``c`` form the causal diagonal. Needs ``available``."""
    c, total = q.shape[2], k.shape[2]
    if q.device.type == "cuda":
        return lower_right_sdpa(q, k, v, scale=scale, dropout_p=dropout_p)
    if dropout_p:
        raise ValueError("chunk_attention on CPU has no dropout (check available() first)")
    hk, hv = q.shape[-1], v.shape[-1]
    if scale is None:
        scale = hk ** -0.5
    if hk != hv:      # the CPU kernel wants one head size: zero columns change no score or output
        width = max(hk, hv)
        q, k, v = (F.pad(x, (0, width - x.shape[-1])) for x in (q, k, v))
    p = total - c
    out = _CpuPrefixDiagonal.apply(q, k[:, :, :p], v[:, :, :p], k[:, :, p:], v[:, :, p:], scale)
    return out[..., :hv]
