"""The pure tensor side of the HF mapping: fusions and TP splits invert exactly."""

import pytest
import torch

from megatron_rl.checkpoint.hf_mapping import mapping_for, shard, unshard, whole_shape
from megatron_rl.model.hf_config import load_hf_config
from megatron_rl.model.tiny import TINY, tiny_hf_config


@pytest.mark.parametrize("split", [None, "col", "row", "glu"])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_tp_shards_reassemble_to_the_whole_tensor(split, size):
    whole = torch.randn(16, 8)
    pieces = [shard(whole, split, r, size) for r in range(size)]
    assert torch.equal(unshard(pieces, split), whole)
    assert whole_shape(pieces[0].shape, split, size) == tuple(whole.shape)


def test_glu_shard_holds_its_gate_rows_then_its_up_rows():
    # megatron's linear_fc1 under TP: rank r holds [gate_r; up_r], not a contiguous block
    gate, up = torch.arange(8.)[:, None], 100 + torch.arange(8.)[:, None]
    r1 = shard(torch.cat([gate, up]), "glu", 1, 2)
    assert r1[:, 0].tolist() == [4, 5, 6, 7, 104, 105, 106, 107]


def test_qkv_is_grouped_by_kv_group_and_splits_back():
    m = mapping_for(load_hf_config(tiny_hf_config("qwen3_moe")))  # 4 heads, 2 groups, d=32
    rule, _ = m.match("decoder.layers.0.self_attention.linear_qkv.weight")
    q, k, v = (torch.full((n, 3), float(i)) for i, n in enumerate((4 * 32, 2 * 32, 2 * 32)))
    fused = m.to_mcore(rule, [q, k, v])
    # group 0: its 2 query heads, its key head, its value head; then group 1
    assert fused[:, 0].reshape(2, -1, 32)[:, :, 0].tolist() == [[0, 0, 1, 2], [0, 0, 1, 2]]
    assert all(torch.equal(a, b) for a, b in zip(m.to_hf(rule, fused), (q, k, v)))


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_rule_set_names_distinct_hf_tensors(name):
    m = mapping_for(load_hf_config(tiny_hf_config(name)))
    # the grouped-GEMM expert rules (``weight{E}``) are the per-expert rules' other spelling
    names = [n for r in m.rules if not r.tied and not r.mcore.endswith("{E}") for n in r.hf]
    assert len(names) == len(set(names))


def test_an_unknown_megatron_tensor_is_named():
    m = mapping_for(load_hf_config(tiny_hf_config("qwen3")))
    with pytest.raises(KeyError, match="decoder.layers.0.mlp.router.weight"):
        m.match("decoder.layers.0.mlp.router.weight")
