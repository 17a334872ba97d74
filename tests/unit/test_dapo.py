import pytest
import torch

from megatron_rl.algo.dapo import dynamic_sampling_keep, overlong_penalty


def test_dynamic_sampling_drops_exactly_the_groups_with_equal_rewards():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.5])
    groups = torch.tensor([0, 0, 0, 3, 3, 5, 5, 5, 8])
    keep = dynamic_sampling_keep(rewards, groups)
    want = []
    for g in groups.tolist():
        rs = [rewards[k].item() for k in range(len(groups)) if groups[k] == g]
        want.append(max(rs) != min(rs))
    assert keep.tolist() == want == [False] * 3 + [True] * 2 + [False] * 4


def test_dynamic_sampling_tolerance():
    keep = dynamic_sampling_keep(torch.tensor([1.0, 1.0 + 1e-9]), torch.tensor([0, 0]), atol=1e-6)
    assert not keep.any()


def test_overlong_penalty_is_the_dapo_piecewise_function():
    max_len, buf = 20, 8
    lengths = torch.arange(0, 26)
    got = overlong_penalty(lengths, max_len=max_len, buffer_len=buf, penalty_factor=0.5)
    for L, p in zip(lengths.tolist(), got.tolist()):
        if L <= max_len - buf:
            want = 0.0
        elif L <= max_len:
            want = ((max_len - buf) - L) / buf
        else:
            want = -1.0
        assert p == pytest.approx(0.5 * want, abs=1e-7), L


def test_overlong_penalty_rejects_a_buffer_longer_than_the_limit():
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(torch.tensor([3]), max_len=4, buffer_len=5)
