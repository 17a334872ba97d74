"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for megatron-core's
local (TransformerEngine-free) layer spec.

Megatron's own local ``DotProductAttention`` materialises ``[b, np, s, s]`` scores and refuses packed
sequences; SDPA picks the flash / memory-efficient kernel on GPU and runs on CPU. Inputs are
Megatron's: ``[s, b, np, hn]`` (or ``[t, np, hn]`` for packed THD batches, whose sequences are
kept apart by a block-diagonal causal mask built from ``cu_seqlens``). Context-parallel attention
needs TransformerEngine; this module runs with ``context_parallel_size == 1`` only.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

Tensor = torch.Tensor


def _packed_causal_mask(cu_seqlens: Tensor, total: int, device) -> Tensor:
    """``[t, t]`` bool, True where query i may attend key j (same sequence, j <= i)."""
    seq_id = torch.zeros(total, dtype=torch.long, device=device)
    seq_id[cu_seqlens[1:-1].long()] = 1
    seq_id = seq_id.cumsum(0)
    pos = torch.arange(total, device=device)
    return (seq_id[:, None] == seq_id[None, :]) & (pos[None, :] <= pos[:, None])


class SDPAttention(MegatronModule):
    """Drop-in for the ``core_attention`` submodule of Megatron's self-attention."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError(
                "context-parallel attention needs TransformerEngine (model.attention_backend: te); "
                "the SDPA spec runs context_parallel_size 1")
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias=None,
                packed_seq_params=None) -> Tensor:
        mask_type = attn_mask_type or self.attn_mask_type
        if packed_seq_params is not None:                        # [t, np, hn], one sequence stream
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
            allowed = _packed_causal_mask(cu, query.shape[0], query.device)
            q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))
            out = self._sdpa(q, k, v, allowed, False)           # [1, np, t, hn]
            return out.squeeze(0).transpose(0, 1).reshape(query.shape[0], -1)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))   # [b, np, s, hn]
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        allowed = None if attention_mask is None else ~attention_mask    # Megatron: True = masked
        out = self._sdpa(q, k, v, allowed, causal)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _sdpa(self, q, k, v, allowed, causal):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal, scale=self.scale, enable_gqa=k.shape[1] != q.shape[1])
