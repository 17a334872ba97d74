"""Token-budget packing of sequences into micro-batches."""

import pytest

from megatron_rl.train.batches import pack_by_token_budget


def test_every_sequence_is_packed_once_and_no_bin_exceeds_the_budget():
    lengths = [7, 3, 12, 5, 5, 9, 1, 16, 2]
    bins = pack_by_token_budget(lengths, budget=16, multiple=4)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert sum(-(-lengths[i] // 4) * 4 for i in b) <= 16
    assert len(bins) == 5  # 76 padded tokens need at least 5 bins of 16: FFD reaches the bound


def test_a_sequence_longer_than_the_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="sequence 1 has 20 tokens, more than the micro-batch token budget 16"):
        pack_by_token_budget([4, 20], budget=16)
