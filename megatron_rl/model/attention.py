"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for megatron-core's
local (TransformerEngine-free) layer spec, context parallelism included.

Megatron's own local ``DotProductAttention`` materialises ``[b, np, s, s]`` scores, refuses packed
sequences and refuses context parallelism (only TE's attention has it); SDPA picks the flash /
memory-efficient kernel on GPU and runs on CPU. Inputs are Megatron's: ``[s, b, np, hn]`` (or
``[t, np, hn]`` for packed THD batches, whose sequences are kept apart by attending each one on
its own, from ``cu_seqlens_padded``: one causal kernel call per sequence, no ``[t, t]`` mask).

Context parallelism (``context_parallel_attention``): each CP rank holds its two zigzag chunks of
every sequence (``parallel.cp_layout``) for q, k and v. On CPU without dropout the keys and values
travel a ring (``model.ring_attention``: memory per rank ``1 / cp`` of CP 1's). Otherwise (CUDA
without TransformerEngine, or dropout) it all-gathers the keys and values of the
whole sequence over the CP group (one collective for both; the backward reduce-scatters their
gradients, see ``collectives.all_gather_partial``) and masks causally by *global* position: a
local query at position ``p`` of sequence ``s`` attends exactly the keys of ``s`` at positions
``<= p``, the keys it attends at CP 1. Each held chunk attends its sequence's keys up to the
chunk's end, lower-right causal (``_plan``), without a mask (``block_attention``: the keys before
the chunk in one unmasked kernel call, its diagonal block in one causal call, merged exactly by
log-sum-exp on CPU; SDPA's lower-right causal bias on CUDA): the compute is ``(2cp+1)/(2cp)`` of
a perfectly balanced causal split. Memory per rank: the gathered K/V (``cp`` times the local ones)
and the kernels' ``O(n x heads)`` statistics. Only dropout on CPU falls back to one additive mask
per block shape, shared by every layer (``_Layout``). TE's ring
attention (the GPU image's ``attention_backend: te``) overlaps the exchange with compute and
keeps flash kernels: the fast path.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_rl.model import block_attention
from megatron_rl.model.ring_attention import ring_attention
from megatron_rl.parallel.collectives import Group, all_gather_partial, group_rank, group_size
from megatron_rl.parallel.cp_layout import chunk_ids, thd_partition_index

Tensor = torch.Tensor


class _Slice(NamedTuple):
    """One SDPA call of the CP attention: ``q_len`` local queries from ``q_start``, attending the
    ``k_len`` keys from ``k_start`` of the gathered stream in global order, lower-right causal."""

    q_start: int
    q_len: int
    k_start: int
    k_len: int


def _plan(seq_lens: Sequence[int], cp_size: int, cp_rank: int) -> List[_Slice]:
    """Per sequence and per held chunk: chunk ``i`` (global positions ``[i*c, (i+1)*c)``) needs
    the keys of positions ``[0, (i+1)*c)`` of its sequence and nothing later, and its query ``t``
    sees key ``j`` iff ``j <= i*c + t``: the lower-right causal mask of a ``[c, (i+1)*c]`` block.
    Keys past the chunk's end are never computed (no full ``[n, cp*n]`` block)."""
    out, local, start = [], 0, 0
    for L in seq_lens:
        c = L // (2 * cp_size)
        for i in chunk_ids(cp_size, cp_rank):
            out.append(_Slice(local, c, start, (i + 1) * c))
            local += c
        start += L
    return out


class _Layout:
    """Per micro-batch constants shared by every layer (keyed by the sequence lengths): where each
    gathered key goes in global order, and the additive masks. One float mask per block shape,
    shared, so autograd keeps one copy for all layers instead of one per layer and call."""

    key = None
    order: Optional[Tensor] = None
    masks: Dict[tuple, Tensor] = {}

    @classmethod
    def get(cls, seq_lens: Sequence[int], cp_size: int, cp_rank: int, device, dtype):
        """The THD layout of these lengths on this CP rank, rebuilt only when the key changes."""
        key = (tuple(seq_lens), cp_size, cp_rank, str(device), dtype)
        if key != cls.key:
            cu = [0] + list(itertools.accumulate(seq_lens))
            gathered = torch.cat([thd_partition_index(cu, cp_size, r) for r in range(cp_size)])
            cls.key, cls.order, cls.masks = key, gathered.argsort().to(device), {}
        return cls

    @classmethod
    def mask(cls, q_len: int, k_len: int, device, dtype) -> Tensor:
        """``[q_len, k_len]``: 0 where query ``t`` may see key ``j <= t + k_len - q_len``, -inf
        elsewhere (the lower-right causal mask)."""
        m = cls.masks.get((q_len, k_len))
        if m is None:
            m = torch.full((q_len, k_len), float("-inf"), device=device, dtype=dtype)
            m = cls.masks[(q_len, k_len)] = m.triu(k_len - q_len + 1)
        return m


def context_parallel_attention(query: Tensor, key: Tensor, value: Tensor, *, cp_group: Group,
                               seq_lens: Sequence[int], scale: Optional[float] = None,
                               dropout_p: float = 0.0, method: str = "auto") -> Tensor:
    """Causal attention of this CP rank's queries over whole sequences.

    ``query[n, b, np, hn]``, ``key[n, b, ng, hn]``, ``value[n, b, ng, hv]``: this rank's ``n``
    tokens in Megatron's zigzag order (BSHD: every row is one sequence, ``seq_lens = [n * cp]``;
    THD: ``b = 1`` and ``seq_lens`` the padded lengths of the packed sequences, host ints). ``ng``
    may divide ``np`` (grouped-query attention). Returns ``[n, b, np, hv]``. ``method``: ``ring``
    (``model.ring_attention``: CPU without dropout), ``all_gather``, or ``auto`` (the ring where
    it runs).
    """
    if method == "ring" or (method == "auto" and query.device.type == "cpu" and not dropout_p
                            and group_size(cp_group) > 1):
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))   # [b, heads, n, h]
        out = ring_attention(q, k, v, group=cp_group, seq_lens=seq_lens, scale=scale)
        return out.permute(2, 0, 1, 3)                                   # [n, b, np, hv]
    cp, rank = group_size(cp_group), group_rank(cp_group)
    n, b, ng = key.shape[0], key.shape[1], key.shape[2]
    hk, hv = key.shape[3], value.shape[3]
    kv = torch.cat([key.reshape(n, b, ng * hk), value.reshape(n, b, ng * hv)], dim=-1)
    kv = all_gather_partial(kv, cp_group, dim=0)                         # [cp*n, b, ng*(hk+hv)]
    layout = _Layout.get(seq_lens, cp, rank, query.device, query.dtype)
    kv = kv.index_select(0, layout.order)                                # global packed order
    k = kv[..., :ng * hk].reshape(-1, b, ng, hk).permute(1, 2, 0, 3)     # [b, ng, T, hk]
    v = kv[..., ng * hk:].reshape(-1, b, ng, hv).permute(1, 2, 0, 3)
    q = query.permute(1, 2, 0, 3)                                         # [b, np, n, hk]
    unmasked = block_attention.available(query.device, dropout_p)
    outs = []
    for s in _plan(seq_lens, cp, rank):
        qs = q[:, :, s.q_start:s.q_start + s.q_len]
        ks, vs = (x[:, :, s.k_start:s.k_start + s.k_len] for x in (k, v))
        if unmasked:
            outs.append(block_attention.chunk_attention(qs, ks, vs, scale=scale,
                                                        dropout_p=dropout_p))
            continue
        outs.append(F.scaled_dot_product_attention(
            qs, ks, vs, dropout_p=dropout_p, scale=scale,
            attn_mask=layout.mask(s.q_len, s.k_len, query.device, query.dtype),
            enable_gqa=ng != query.shape[2]))
    return torch.cat(outs, dim=2).permute(2, 0, 1, 3)                    # [n, b, np, hv]


def _cp_group_of(pg_collection) -> Group:
    cp = getattr(pg_collection, "cp", None)
    if cp is None:
        from megatron.core import parallel_state as ps

        cp = ps.get_context_parallel_group()
    return cp if group_size(cp) > 1 else None


class SDPAttention(MegatronModule):
    """Drop-in for the ``core_attention`` submodule of Megatron's self-attention."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale
        # cp_comm_type (p2p / a2a / all_gather) picks TE's schedule; this path always all-gathers
        self.cp_group = _cp_group_of(pg_collection) if config.context_parallel_size > 1 else None

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias=None,
                packed_seq_params=None) -> Tensor:
        """Attention with torch's SDPA; under CP, this rank's query chunks over keys and values
        gathered from the CP group, causal by global position."""
        mask_type = attn_mask_type or self.attn_mask_type
        dropout = self.dropout if self.training else 0.0
        if self.cp_group is not None:
            return self._context_parallel(query, key, value, attention_mask, mask_type,
                                          packed_seq_params, dropout)
        if packed_seq_params is not None:                        # [t, np, hn], one sequence stream
            return self._packed(query, key, value, _host_cu_seqlens(packed_seq_params), dropout)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))   # [b, np, s, hn]
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        allowed = None if attention_mask is None else ~attention_mask    # Megatron: True = masked
        out = self._sdpa(q, k, v, allowed, causal, dropout)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _context_parallel(self, query, key, value, attention_mask, mask_type, packed_seq_params,
                          dropout):
        if attention_mask is not None or mask_type not in (AttnMaskType.causal,
                                                           AttnMaskType.padding_causal):
            raise ValueError("context-parallel SDPA attention is causal only (an explicit "
                             "attention mask cannot be sharded by position); use "
                             "model.attention_backend: te for other masks")
        cp = group_size(self.cp_group)
        if packed_seq_params is not None:                        # [t, np, hn]
            cu = _host_cu_seqlens(packed_seq_params)
            out = context_parallel_attention(
                query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), cp_group=self.cp_group,
                seq_lens=[e - s for s, e in zip(cu[:-1], cu[1:])], scale=self.scale,
                dropout_p=dropout)
            return out.reshape(query.shape[0], -1)
        s, b = query.shape[0], query.shape[1]
        out = context_parallel_attention(query, key, value, cp_group=self.cp_group,
                                         seq_lens=[s * cp], scale=self.scale, dropout_p=dropout)
        return out.reshape(s, b, -1)

    def _packed(self, query, key, value, cu: Sequence[int], dropout):
        """Causal attention within each packed sequence (``cu``: host boundaries): one causal
        kernel call per sequence, so nothing is quadratic in the packed stream's length (a
        block-diagonal ``[t, t]`` mask would be, and would make the kernel score every pair)."""
        t = query.shape[0]
        bounds = [(s, e) for s, e in zip(cu[:-1], cu[1:]) if e > s]
        if cu[-1] < t:                           # a tail past the last sequence: its own segment
            bounds.append((cu[-1], t))
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))   # [1, np, t, hn]
        outs = [self._sdpa(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], None, True, dropout)
                for s, e in bounds]
        out = torch.cat(outs, dim=2)
        return out.squeeze(0).transpose(0, 1).reshape(t, -1)

    def _sdpa(self, q, k, v, allowed, causal, dropout):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout, is_causal=causal, scale=self.scale,
            enable_gqa=k.shape[1] != q.shape[1])


def _host_cu_seqlens(packed_seq_params) -> List[int]:
    """The padded boundaries of the packed (global, un-sharded) sequences, on the host: the copy
    our batch builder attaches (``host_cu_seqlens``), else read back from the device once."""
    host = getattr(packed_seq_params, "host_cu_seqlens", None)
    if host is not None:
        return list(host)
    cu = packed_seq_params.cu_seqlens_q_padded
    return (packed_seq_params.cu_seqlens_q if cu is None else cu).tolist()
