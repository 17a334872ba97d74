"""Fused log-prob + entropy (one vocabulary shard here; TP=2 runs in tests/distributed)."""

import pytest
import torch

from megatron_rl.parallel.vocab_parallel import vocab_parallel_logprobs


def _reference(z, t):
    ls = torch.log_softmax(z.double(), -1)
    return ls.gather(-1, t[..., None]).squeeze(-1), -(ls.exp() * ls).sum(-1)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_logprob_entropy_and_their_gradients_equal_log_softmax(chunk):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(4, 5, 17, generator=g, dtype=torch.float64) * 4).requires_grad_()
    t = torch.randint(0, 17, (4, 5), generator=g)
    w1, w2 = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    lp, ent = vocab_parallel_logprobs(z, t, chunk_tokens=chunk)
    rlp, rent = _reference(z, t)
    assert torch.allclose(lp, rlp, rtol=0, atol=1e-13) and torch.allclose(ent, rent, rtol=0, atol=1e-13)
    got = torch.autograd.grad((lp * w1 + ent * w2).sum(), z)[0]
    want = torch.autograd.grad((rlp * w1 + rent * w2).sum(), z)[0]
    assert torch.allclose(got, want, rtol=0, atol=1e-13)


def test_gradcheck_each_output_alone():
    z = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (6,))
    assert torch.autograd.gradcheck(lambda x: vocab_parallel_logprobs(x, t, chunk_tokens=4)[0], (z,))
    assert torch.autograd.gradcheck(lambda x: vocab_parallel_logprobs(x, t, chunk_tokens=4)[1], (z,))


def test_bf16_logits_give_fp32_math_and_a_bf16_gradient_and_stay_untouched():
    z32 = torch.randn(33, 50) * 5
    z = z32.bfloat16().requires_grad_()
    before = z.detach().clone()
    t = torch.randint(0, 50, (33,))
    lp, ent = vocab_parallel_logprobs(z, t, chunk_tokens=8)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    rlp, rent = _reference(z.detach().float(), t)   # the same bf16 values, upcast
    assert torch.allclose(lp.double(), rlp, atol=2e-5) and torch.allclose(ent.double(), rent, atol=2e-5)
    (lp.sum() + ent.sum()).backward()
    assert z.grad.dtype == torch.bfloat16
    assert torch.equal(z.detach(), before)


def test_fp32_logits_are_not_modified_in_place():
    z = torch.randn(9, 11, requires_grad=True)
    before = z.detach().clone()
    lp, ent = vocab_parallel_logprobs(z, torch.randint(0, 11, (9,)), chunk_tokens=2)
    (lp + ent).sum().backward()
    assert torch.equal(z.detach(), before)


def test_targets_outside_the_vocabulary_give_finite_values_that_a_mask_drops():
    z = torch.randn(4, 6, requires_grad=True)
    t = torch.tensor([1, -100, 5, -100])
    lp, ent = vocab_parallel_logprobs(z, t)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    mask = (t >= 0).float()
    (lp * mask).sum().backward()
    assert torch.equal(z.grad[1], torch.zeros(6)) and torch.equal(z.grad[3], torch.zeros(6))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="logits must be targets.shape"):
        vocab_parallel_logprobs(torch.zeros(3, 4, 5), torch.zeros(4, 3, dtype=torch.long))


@pytest.mark.parametrize("scale", [1.0, 3.0, 10.0])
def test_fp32_entropy_and_logprob_are_as_precise_as_a_plain_fp32_log_softmax(scale):
    """Against float64 at Qwen's vocabulary (151,936): the fused kernel's entropy error is no
    worse than that of ``-(p * log p).sum()`` on an fp32 ``log_softmax``."""
    V = 151_936
    g = torch.Generator().manual_seed(0)
    z = torch.randn(48, V, generator=g) * scale
    t = torch.randint(0, V, (48,), generator=g)
    ref_lsm = torch.log_softmax(z.double(), -1)
    ref_h = -(ref_lsm.exp() * ref_lsm).sum(-1)
    lsm = torch.log_softmax(z, -1)
    plain_h, plain_lp = -(lsm.exp() * lsm).sum(-1), lsm.gather(1, t[:, None]).squeeze(1)
    lp, h = vocab_parallel_logprobs(z, t, chunk_tokens=16)
    err = lambda a, b: (a.double() - b).abs().max().item()   # noqa: E731
    assert err(h, ref_h) <= err(plain_h, ref_h), (err(h, ref_h), err(plain_h, ref_h))
    ref_lp = ref_lsm.gather(1, t[:, None]).squeeze(1)
    assert err(lp, ref_lp) <= max(err(plain_lp, ref_lp), 1e-5)
