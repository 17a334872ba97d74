import math

import pytest
import torch

from megatron_rl.algo.kl import kl_estimate
from megatron_rl.algo.registry import UnknownNameError


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimates_match_their_definitions_elementwise(batch, kind):
    lp, ref = batch["lp"], batch["ref"]
    out = kl_estimate(lp, ref, kind)
    for i in range(lp.shape[0]):
        for j in range(lp.shape[1]):
            lr = ref[i, j].item() - lp[i, j].item()
            want = {"k1": -lr, "k2": lr * lr / 2, "k3": math.exp(lr) - 1 - lr}[kind]
            assert out[i, j].item() == pytest.approx(want, abs=1e-12)


def test_k1_k3_unbiased_and_k2_biased_by_exact_expectation():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    expect = {k: (p * kl_estimate(p.log(), q.log(), k)).sum().item() for k in ("k1", "k2", "k3")}
    assert expect["k1"] == pytest.approx(true_kl, abs=1e-12)
    assert expect["k3"] == pytest.approx(true_kl, abs=1e-12)
    assert abs(expect["k2"] - true_kl) > 0.05


def test_k3_is_nonnegative_and_exact_near_on_policy():
    lp = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    out = kl_estimate(lp, lp + 1e-9, "k3")
    assert (out >= 0).all()
    assert out[0].item() == pytest.approx(0.5e-18, rel=1e-6)


def test_kl_mask_zeroes_padding_and_clamp_bounds_log_ratio(batch):
    lp, ref, mask = batch["lp"], batch["ref"], batch["mask"]
    out = kl_estimate(lp, ref, "k3", mask=mask)
    assert (out[mask == 0] == 0).all()
    clamped = kl_estimate(torch.zeros(1), torch.tensor([50.0]), "k3", clamp_log_ratio=10.0)
    assert clamped.item() == pytest.approx(math.exp(10) - 1 - 10, rel=1e-6)


def test_verl_k3_clamps_log_ratio_to_20_and_value_to_10_and_clamped_values_pass_no_gradient():
    # verl's low_var_kl: log r = ref - lp clamped to +-20, then r - log r - 1 clamped to +-10
    lp = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([50.0, -50.0, 0.5], dtype=torch.float64)
    out = kl_estimate(lp, ref, "k3", clamp_log_ratio=20.0, clamp_value=10.0)
    log_r = (ref - lp.detach()).clamp(-20, 20)
    want = (log_r.exp() - log_r - 1).clamp(-10, 10)
    assert torch.equal(out.detach(), want)
    assert out.tolist()[:2] == [10.0, 10.0]            # e^20 and 19 + e^-20: both cut to 10
    out.sum().backward()
    assert lp.grad[:2].tolist() == [0.0, 0.0]
    assert lp.grad[2].item() == pytest.approx(1 - math.exp(0.5))


def test_unknown_kl_kind_lists_known_ones():
    with pytest.raises(UnknownNameError, match="k1, k2, k3") as e:
        kl_estimate(torch.zeros(1), torch.zeros(1), "k33")
    assert "did you mean" in str(e.value)
