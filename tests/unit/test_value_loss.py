"""The critic's clipped value loss against a loop reference, and explained variance against numpy."""

import numpy as np
import pytest
import torch

from megatron_rl.algo.value import ev_moments, explained_variance, explained_variance_from_moments, value_loss


@pytest.fixture
def v(batch):
    g = torch.Generator().manual_seed(4)
    shape = batch["mask"].shape
    old = torch.randn(shape, generator=g, dtype=torch.float64)
    return dict(mask=batch["mask"], old=old,
                values=old + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64),
                returns=old + torch.randn(shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_clipped_value_loss_and_gradient_equal_the_loop_reference(v, clip, agg):
    values = v["values"].clone().requires_grad_()
    n_tok, n_seq = v["mask"].sum(), float(v["mask"].shape[0])
    loss, met = value_loss(values, v["old"], v["returns"], v["mask"], num_tokens=n_tok,
                           num_seqs=n_seq, clip=clip, agg=agg)
    (grad,) = torch.autograd.grad(loss, values)
    want_loss, want_grad, clipped = 0.0, torch.zeros_like(values), 0
    V, O, G, M = (v[k].tolist() for k in ("values", "old", "returns", "mask"))
    for i in range(len(M)):
        H = sum(M[i])
        norm = n_tok.item() if agg == "token-mean" else H * n_seq
        for j in range(len(M[i])):
            if not M[i][j]:
                continue
            a = (V[i][j] - G[i][j]) ** 2
            if clip is None:
                term, d = a, 2 * (V[i][j] - G[i][j])
            else:
                vb = O[i][j] + min(max(V[i][j] - O[i][j], -clip), clip)
                b = (vb - G[i][j]) ** 2
                inside = abs(V[i][j] - O[i][j]) < clip
                term = max(a, b)
                d = 2 * (V[i][j] - G[i][j]) if a >= b else (2 * (vb - G[i][j]) if inside else 0.0)
                clipped += b > a
            want_loss += 0.5 * term / norm
            want_grad[i, j] = 0.5 * d / norm
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert met["value_clip_frac"].item() == pytest.approx(clipped / n_tok.item())
    if clip is not None:
        assert clipped > 0          # the clip binds on this batch


def test_explained_variance_equals_numpy_and_adds_up_over_micro_batches(v):
    m = v["mask"].numpy() > 0
    g, val = v["returns"].numpy()[m], v["values"].numpy()[m]
    want = 1 - np.var(g - val) / np.var(g)
    assert explained_variance(v["values"], v["returns"], v["mask"]).item() == pytest.approx(want, rel=1e-12)
    parts = [slice(0, 2), slice(2, 6)]
    moments = sum(ev_moments(v["values"][p], v["returns"][p], v["mask"][p]) for p in parts)
    assert explained_variance_from_moments(moments).item() == pytest.approx(want, rel=1e-12)
    perfect = explained_variance(v["returns"], v["returns"], v["mask"])
    assert perfect.item() == pytest.approx(1.0)
    flat = torch.ones_like(v["returns"])
    assert torch.isnan(explained_variance(v["values"], flat, v["mask"]))


def test_value_clip_must_be_positive(v):
    with pytest.raises(ValueError, match="value clip must be positive"):
        value_loss(v["values"], v["old"], v["returns"], v["mask"], num_tokens=1.0, num_seqs=1.0,
                   clip=0.0)
