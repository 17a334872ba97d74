"""The CP attention's single-process pieces: the per-chunk plan reproduces causal attention, and
its masks are lower-right causal (the multi-rank equality is tests/distributed/test_context_parallel.py)."""

import torch

from megatron_rl.model.attention import SDPAttention, _Layout, _plan, context_parallel_attention
from tests.distributed.cp_workers import reference_attention


def test_lower_right_mask_lets_query_t_see_keys_up_to_t_plus_the_offset():
    m = _Layout.mask(3, 7, "cpu", torch.float32)
    allowed = m == 0
    for t in range(3):
        assert allowed[t].tolist() == [j <= t + 4 for j in range(7)]


def test_the_plan_covers_each_local_token_once_with_keys_up_to_its_chunk_end():
    # CP 2, rank 1 holds chunks 1 and 2 of each sequence (chunk length c = L / 4)
    plan = _plan([8, 16], 2, 1)
    assert [(s.q_start, s.q_len, s.k_start, s.k_len) for s in plan] == [
        (0, 2, 0, 4), (2, 2, 0, 6), (4, 4, 8, 8), (8, 4, 8, 12)]


def test_one_rank_equals_causal_attention_per_packed_sequence():
    g = torch.Generator().manual_seed(0)
    lens = [6, 2, 10]
    q = torch.randn(sum(lens), 1, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(sum(lens), 1, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out = context_parallel_attention(q, k, v, cp_group=None, seq_lens=lens, scale=8 ** -0.5)
    assert (out - reference_attention(q, k, v, lens)).abs().max() < 1e-12


def test_packed_sequences_attend_only_themselves_without_a_stream_mask():
    g = torch.Generator().manual_seed(1)
    lens = [6, 2, 10, 4]
    t = sum(lens) + 3                       # a padded tail past the last sequence
    q = torch.randn(t, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(t, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    attn = SDPAttention.__new__(SDPAttention)   # no Megatron config needed for this path
    attn.scale = 8 ** -0.5
    cu = [0, 6, 8, 18, 22]
    out = attn._packed(q, k, v, cu, 0.0).reshape(t, 4, 8)
    ref = reference_attention(q[:, None], k[:, None], v[:, None], lens + [3])[:, 0]
    assert (out - ref).abs().max() < 1e-12


def test_packed_boundaries_come_from_the_builders_host_copy_else_the_padded_tensor():
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_rl.model.attention import _host_cu_seqlens
    from megatron_rl.train.batches import _packed_seq_params

    psp = _packed_seq_params([0, 4, 12], 8)
    assert _host_cu_seqlens(psp) == [0, 4, 12] == psp.cu_seqlens_q_padded.tolist()
    psp.host_cu_seqlens = (0, 5, 12)            # the host copy wins: no device read-back
    assert _host_cu_seqlens(psp) == [0, 5, 12]
    bare = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 3, 6]),
                           cu_seqlens_q_padded=torch.tensor([0, 4, 8]))
    assert _host_cu_seqlens(bare) == [0, 4, 8]
