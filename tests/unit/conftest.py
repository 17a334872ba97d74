import pytest
import torch


@pytest.fixture
def batch():
    """Two groups of three responses, uneven lengths, one environment (masked) token mid-response,
    one response with a single action token; float64 so references compare at 1e-10."""
    g = torch.Generator().manual_seed(1234)
    B, T = 6, 7
    mask = torch.ones(B, T, dtype=torch.float64)
    lengths = [7, 5, 6, 1, 4, 7]
    for i, n in enumerate(lengths):
        mask[i, n:] = 0
    mask[0, 3] = 0  # a tool-output token inside response 0
    mask[5, 2] = 0
    return dict(
        mask=mask,
        group_ids=torch.tensor([0, 0, 0, 1, 1, 1]),
        rewards=torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0], dtype=torch.float64),
        kl=torch.rand(B, T, generator=g, dtype=torch.float64) * 0.3,
        values=torch.randn(B, T, generator=g, dtype=torch.float64),
        lp=-torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
        old=-torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
        ref=-torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
    )


def pad(t, extra, value=0.0):
    """Append ``extra`` padding columns (mask 0) to a [B,T] tensor."""
    return torch.cat([t, torch.full((t.shape[0], extra), value, dtype=t.dtype)], dim=1)


def insert_env_tokens(t, at, n, value):
    """Insert ``n`` columns of ``value`` at column ``at`` (environment tokens when mask is 0)."""
    fill = torch.full((t.shape[0], n), value, dtype=t.dtype)
    return torch.cat([t[:, :at], fill, t[:, at:]], dim=1)
