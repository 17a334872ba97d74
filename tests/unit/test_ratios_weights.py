import pytest
import torch

from megatron_rl.algo.ratios import log_ratio
from megatron_rl.algo.weights import WEIGHT_FUNCTIONS, ppo_clip, power, truncated_is, upper_clip

from tests.unit import reference as ref
from tests.unit.conftest import insert_env_tokens, pad


@pytest.mark.parametrize("kind", ["token", "sequence", "future"])
def test_log_ratio_matches_loop_reference(batch, kind):
    got = log_ratio(kind, batch["lp"], batch["old"], batch["mask"])
    want = ref.log_ratio(kind, batch["lp"], batch["old"], batch["mask"])
    torch.testing.assert_close(got, torch.tensor(want, dtype=got.dtype))


@pytest.mark.parametrize("kind", ["token", "sequence", "future"])
def test_log_ratio_ignores_padding_and_environment_tokens(batch, kind):
    base = log_ratio(kind, batch["lp"], batch["old"], batch["mask"])
    lp, old = pad(batch["lp"], 2, -9.0), pad(batch["old"], 2, 3.0)
    torch.testing.assert_close(log_ratio(kind, lp, old, pad(batch["mask"], 2))[:, :-2], base)
    lp = insert_env_tokens(batch["lp"], 1, 2, -7.0)
    old = insert_env_tokens(batch["old"], 1, 2, 0.0)
    got = log_ratio(kind, lp, old, insert_env_tokens(batch["mask"], 1, 2, 0.0))
    torch.testing.assert_close(torch.cat([got[:, :1], got[:, 3:]], 1), base)


def test_sequence_log_ratio_uses_given_global_lengths(batch):
    """Under CP a rank holds part of a sequence; the mean must divide by the global length."""
    lengths = batch["mask"].sum(-1) * 2
    got = log_ratio("sequence", batch["lp"], batch["old"], batch["mask"], lengths=lengths)
    full = log_ratio("sequence", batch["lp"], batch["old"], batch["mask"])
    torch.testing.assert_close(got, full / 2)


# the five cases of the seed's table: (rho, A) -> inside, clipped above, below-with-A>0, ...
PPO_CASES = [
    (1.05, 1.0),   # inside the trust region: gradient rho*A
    (1.5, 1.0),    # A > 0, rho above 1+eps: clipped, no gradient
    (0.5, 1.0),    # A > 0, rho below 1-eps: min picks rho*A, gradient kept
    (0.5, -1.0),   # A < 0, rho below 1-eps: clipped, no gradient
    (1.5, -1.0),   # A < 0, rho above 1+eps: min picks rho*A, gradient kept
]


@pytest.mark.parametrize("rho,a", PPO_CASES)
@pytest.mark.parametrize("dual_clip", [None, 1.4])
def test_ppo_clip_weight_has_the_gradient_of_the_clipped_objective(rho, a, dual_clip):
    eps = 0.2
    lp = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    old = lp.detach() - torch.log(torch.tensor(rho, dtype=torch.float64))
    ratio = torch.exp(lp - old)
    obj = torch.min(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
    if dual_clip is not None and a < 0:
        obj = torch.max(obj, torch.tensor(dual_clip * a, dtype=torch.float64))
    (g_ref,) = torch.autograd.grad(-obj, lp)
    w = ppo_clip(ratio.detach(), torch.tensor(a), eps_low=eps, eps_high=eps, dual_clip=dual_clip).w
    lp2 = lp.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(-(w * a * lp2), lp2)
    assert g.item() == pytest.approx(g_ref.item(), abs=1e-12)


def test_ppo_clip_higher_and_clip_flags():
    rho = torch.tensor([1.25, 1.25, 0.75, 0.75])
    a = torch.tensor([1.0, -1.0, -1.0, 1.0])
    w = ppo_clip(rho, a, eps_low=0.3, eps_high=0.28)  # clip-higher: 1.25 is inside
    assert w.w.tolist() == rho.tolist() and not w.clipped_high.any()
    w = ppo_clip(rho, a, eps_low=0.2, eps_high=0.2)
    assert w.clipped_high.tolist() == [True, False, False, False]
    assert w.clipped_low.tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip(rho, a, dual_clip=1.1)


def test_upper_clip_and_power_match_definitions():
    rho = torch.tensor([0.1, 0.9, 1.0, 1.3, 4.0], dtype=torch.float64)
    a = torch.ones_like(rho)
    assert upper_clip(rho, a, eps=0.2).w.tolist() == [min(r, 1.2) for r in rho.tolist()]
    for q in (0.0, 0.3, 0.5, 1.0, 2.0):
        want = [r ** q for r in rho.tolist()]
        torch.testing.assert_close(power(rho, a, q=q).w, torch.tensor(want, dtype=torch.float64))


def test_power_weights_interpolate_between_no_is_and_full_is():
    rho = torch.tensor([0.2, 0.8, 1.0, 1.7, 5.0], dtype=torch.float64)
    a = torch.ones_like(rho)
    none, full = WEIGHT_FUNCTIONS["none"](rho, a).w, WEIGHT_FUNCTIONS["full"](rho, a).w
    torch.testing.assert_close(power(rho, a, q=0.0).w, none)
    torch.testing.assert_close(power(rho, a, q=1.0).w, full)
    prev = none
    for q in (0.25, 0.5, 0.75):
        w = power(rho, a, q=q).w
        assert (w >= torch.minimum(none, full)).all() and (w <= torch.maximum(none, full)).all()
        assert ((w - prev) * (full - none) >= 0).all()  # moves monotonically towards full IS
        prev = w


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_truncated_is_matches_loop_reference(batch, level, mode):
    cap = 1.5
    out = truncated_is(batch["old"], batch["lp"], batch["mask"], cap=cap, mode=mode, level=level)
    lr = ref.log_ratio(level, batch["old"], batch["lp"], batch["mask"])
    m = ref.lists(batch["mask"])
    for i in range(len(lr)):
        for j in range(len(lr[0])):
            rho = torch.tensor(lr[i][j], dtype=torch.float64).exp().item()
            over = rho > cap and m[i][j] > 0
            want = min(rho, cap) if mode == "truncate" else (0.0 if over else 1.0)
            assert out.w[i, j].item() == pytest.approx(want, abs=1e-12)
            assert bool(out.capped[i, j]) == over
    assert out.capped.any() and not out.w.requires_grad
