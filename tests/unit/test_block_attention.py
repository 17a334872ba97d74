"""The mask-free CP attention block (``model.block_attention``): a query chunk over the keys before
it and its causal diagonal, merged by log-sum-exp, equals lower-right causal attention with a
brute-force mask, forward and backward, and the merge's backward needs the merged statistics."""

import pytest
import torch
import torch.nn.functional as F

from megatron_rl.model import block_attention as BA


def _masked_reference(q, k, v, scale):
    """Lower-right causal attention from explicit scores (float64)."""
    c, total = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(rep, dim=1) for x in (k, v))
    scores = (q @ k.transpose(-1, -2)) * scale
    allowed = torch.ones(c, total, dtype=torch.bool).tril(total - c)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def _leaves(c, prefix, hk, hv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = dict(q=mk(2, 4, c, hk), k=mk(2, 2, prefix + c, hk), v=mk(2, 2, prefix + c, hv))
    w = mk(2, 4, c, hv)
    return x, w


def _grads(fn, x, w, dtype):
    leaves = {n: t.detach().to(dtype).clone().requires_grad_() for n, t in x.items()}
    out = fn(leaves["q"], leaves["k"], leaves["v"])
    (out.double() * w).sum().backward()
    return out.detach().double(), {n: t.grad.double() for n, t in leaves.items()}


@pytest.mark.parametrize("prefix,hk,hv", [(0, 8, 8), (12, 8, 8), (12, 8, 6), (5, 6, 10)])
@pytest.mark.parametrize("path", ["cpu_merge", "lower_right_bias"])
def test_chunk_attention_equals_masked_causal_attention_with_its_gradients(prefix, hk, hv, path):
    x, w = _leaves(6, prefix, hk, hv, torch.float64)
    scale = hk ** -0.5
    fn = (lambda q, k, v: BA.chunk_attention(q, k, v, scale=scale)) if path == "cpu_merge" else (
        lambda q, k, v: BA.lower_right_sdpa(q, k, v, scale=scale))
    out, grads = _grads(fn, x, w, torch.float64)
    ref, ref_grads = _grads(lambda q, k, v: _masked_reference(q, k, v, scale), x, w, torch.float64)
    assert (out - ref).abs().max() < 1e-12
    for n in "qkv":
        assert (grads[n] - ref_grads[n]).abs().max() < 1e-12, n


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_chunk_attention_in_low_precision_is_as_close_as_the_masked_kernel(dtype, tol):
    x, w = _leaves(16, 32, 8, 8, dtype, seed=1)
    scale = 8 ** -0.5
    ref, ref_grads = _grads(lambda q, k, v: _masked_reference(q, k, v, scale), x, w, torch.float64)
    out, grads = _grads(lambda q, k, v: BA.chunk_attention(q, k, v, scale=scale), x, w, dtype)
    masked, masked_grads = _grads(lambda q, k, v: BA.lower_right_sdpa(q, k, v, scale=scale), x, w,
                                  dtype)
    err = max([(out - ref).abs().max()] + [(grads[n] - ref_grads[n]).abs().max() for n in "qkv"])
    base = max([(masked - ref).abs().max()]
               + [(masked_grads[n] - ref_grads[n]).abs().max() for n in "qkv"])
    assert err < tol and err <= 4 * base + 1e-6, (float(err), float(base))


def test_the_backward_with_each_parts_own_statistics_is_wrong():
    """The mutation the merge guards against: each part's flash backward with its own output and
    log-sum-exp instead of the merged ones."""
    x, w = _leaves(6, 12, 8, 8, torch.float64)
    q, k, v = (x[n].clone().requires_grad_() for n in "qkv")
    out = BA.chunk_attention(q, k, v, scale=8 ** -0.5)
    (out * w).sum().backward()
    p = 12
    od, ld = BA._cpu_flash(q.detach(), k[:, :, p:].detach(), v[:, :, p:].detach(), 0.0, True,
                           scale=8 ** -0.5)
    wrong_dq = BA._cpu_flash_backward(w.contiguous(), q.detach(), k[:, :, p:].detach(),
                                      v[:, :, p:].detach(), od, ld, 0.0, True, scale=8 ** -0.5)[0]
    op, lp = BA._cpu_flash(q.detach(), k[:, :, :p].detach(), v[:, :, :p].detach(), 0.0, False,
                           scale=8 ** -0.5)
    wrong_dq = wrong_dq + BA._cpu_flash_backward(w.contiguous(), q.detach(), k[:, :, :p].detach(),
                                                 v[:, :, :p].detach(), op, lp, 0.0, False,
                                                 scale=8 ** -0.5)[0]
    assert (wrong_dq - q.grad).abs().max() > 0.1


def test_dropout_on_cpu_keeps_the_masked_path_and_cuda_never_needs_it():
    assert BA.available(torch.device("cpu"), 0.0)
    assert not BA.available(torch.device("cpu"), 0.1)
    assert BA.available(torch.device("cuda"), 0.1)
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="no dropout"):
        BA.chunk_attention(q, q, q, scale=None, dropout_p=0.1)
    assert torch.equal(BA.chunk_attention(q, q, q, scale=None),
                       F.scaled_dot_product_attention(q, q, q, is_causal=True))
