"""GPU checks (bf16). Skipped, with the reason, without CUDA. The model path on GPU (batches on the
device, TE spec, bf16 step) is not covered yet: no GPU was lent to write it against."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_fused_logprob_entropy_on_gpu_in_bf16_matches_fp32_log_softmax():
    from megatron_rl.parallel.vocab_parallel import vocab_parallel_logprobs

    z = (torch.randn(4096, 32000, device="cuda") * 3).bfloat16().requires_grad_()
    t = torch.randint(0, 32000, (4096,), device="cuda")
    lp, ent = vocab_parallel_logprobs(z, t)
    ls = torch.log_softmax(z.detach().float(), -1)
    assert torch.allclose(lp, ls.gather(1, t[:, None]).squeeze(1), atol=1e-4)
    assert torch.allclose(ent, -(ls.exp() * ls).sum(-1), atol=1e-3)
    (lp.sum() + ent.sum()).backward()
    assert z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad.float()).all()

