"""Issue 20's algorithm fidelity: the KL that stays correct off-policy (inside the importance
weight), the load-time guards on KL placements, the peers' clipped-surrogate metric, Clip-Cov's
exact selection, future-KL std clipping, step-wide whitening and the epoch shuffles. Each against
a loop reference in float64."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch

from megatron_rl.algo.advantages import compute_advantages, step_whitening
from megatron_rl.algo.entropy_control import centred_covariance, clip_cov_select
from megatron_rl.algo.losses import policy_loss
from megatron_rl.algo.masked import masked_whiten, whiten_moments, whiten_with_moments
from megatron_rl.config import ConfigError, load_config
from megatron_rl.train.rl_batch import epoch_orders

from tests.unit import reference as ref

RECIPES = pathlib.Path(__file__).resolve().parents[2] / "configs" / "recipes"


@pytest.fixture
def b(batch):
    out = dict(batch)
    g = torch.Generator().manual_seed(11)
    # old log-probs 0.3 off the current ones: rho from ~0.5 to ~2, both sides of every clip
    out["old"] = batch["lp"] + 0.3 * torch.randn(batch["lp"].shape, dtype=torch.float64, generator=g)
    out["adv"] = compute_advantages("grpo", rewards=batch["rewards"], mask=batch["mask"],
                                    group_ids=batch["group_ids"])
    return out


def _grad(b, name="reinforce", old=None, **params):
    lp = b["lp"].detach().clone().requires_grad_()
    loss, met = policy_loss(name, logprobs=lp, old_logprobs=b["old"] if old is None else old,
                            advantages=b["adv"], mask=b["mask"], ref_logprobs=b["ref"],
                            num_tokens=b["mask"].sum(), num_seqs=float(b["mask"].shape[0]), **params)
    (g,) = torch.autograd.grad(loss, lp)
    return g, met


def _ppo_weight(rho, a, el, eh):
    clipped = min(max(rho, 1 - el), 1 + eh)
    return 0.0 if (rho - clipped) * a > 0 else rho


# ---------------------------------------------------------------- the KL inside the weight

@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_in_the_surrogate_gradient_equals_autograd_through_the_kl_reward_surrogate(b, kind):
    """Reference: the PPO surrogate with the per-token reward ``A - beta * c`` (``c`` = log(pi /
    pi_ref) for k1, 1 - pi_ref/pi for k3, a constant of the loss), differentiated by autograd,
    token by token."""
    beta, el, eh = 0.3, 0.1, 0.15
    g, _ = _grad(b, "grpo", kl_coef=beta, kl_kind=kind, kl_placement="surrogate",
                 eps_low=el, eps_high=eh)
    lp, old, reflp, a, m = (b[k].tolist() for k in ("lp", "old", "ref", "adv", "mask"))
    n = b["mask"].sum().item()
    want = torch.zeros_like(b["lp"])
    for i in range(len(m)):
        for j in range(len(m[0])):
            if not m[i][j]:
                continue
            c = lp[i][j] - reflp[i][j] if kind == "k1" else 1 - math.exp(reflp[i][j] - lp[i][j])
            a_hat = a[i][j] - beta * c
            x = torch.tensor(lp[i][j], dtype=torch.float64, requires_grad=True)
            rho = torch.exp(x - old[i][j])
            surrogate = torch.minimum(rho * a_hat, rho.clamp(1 - el, 1 + eh) * a_hat)
            (-surrogate / n).backward()
            want[i, j] = x.grad
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind,loss_kind", [("k1", "k2"), ("k3", "k3")])
def test_kl_in_the_surrogate_reduces_to_the_loss_placement_on_policy(b, kind, loss_kind):
    on = b["lp"].detach()   # rho = 1: the first update of a step
    g_sur, _ = _grad(b, "grpo", old=on, kl_coef=0.2, kl_kind=kind, kl_placement="surrogate")
    g_loss, _ = _grad(b, "grpo", old=on, kl_coef=0.2, kl_kind=loss_kind, kl_placement="loss")
    torch.testing.assert_close(g_sur, g_loss, rtol=1e-10, atol=1e-12)


def test_off_policy_the_loss_placement_ignores_rho_and_the_surrogate_weights_it(b):
    """The flaw being fixed: the loss-side KL gradient is the same whatever rho is."""
    no_adv = {**b, "adv": torch.zeros_like(b["adv"])}        # the KL's gradient alone
    on = b["lp"].detach()
    kw = dict(kl_coef=0.5, kl_kind="k3", weight="full")
    g_loss_on, _ = _grad(no_adv, old=on, kl_placement="loss", **kw)
    g_loss_off, _ = _grad(no_adv, kl_placement="loss", **kw)
    g_sur_off, _ = _grad(no_adv, kl_placement="surrogate", **kw)
    torch.testing.assert_close(g_loss_off, g_loss_on)                       # rho ignored
    rho = torch.exp(b["lp"] - b["old"]) * b["mask"]
    torch.testing.assert_close(g_sur_off, g_loss_on * rho, rtol=1e-10, atol=1e-12)


def test_kl_in_the_surrogate_k2_is_the_k1_penalty_and_unknown_kinds_are_refused(b):
    """``c = log(pi/pi_ref)`` is k2's derivative (the loss-side default) and k1 names it too."""
    g2, _ = _grad(b, "grpo", kl_coef=0.1, kl_kind="k2", kl_placement="surrogate")
    g1, _ = _grad(b, "grpo", kl_coef=0.1, kl_kind="k1", kl_placement="surrogate")
    torch.testing.assert_close(g2, g1, rtol=0, atol=0)
    with pytest.raises(ValueError, match="use k2 .* or k3"):
        _grad(b, "grpo", kl_coef=0.1, kl_kind="k4", kl_placement="surrogate")


def test_the_loss_side_kl_defaults_to_k2_whose_gradient_is_the_reverse_kls(b):
    """On-policy, the k2 loss's gradient is ``E_pi[log(pi/ref) grad lp]`` = grad KL(pi||ref): the
    exact reverse-KL gradient of a tiny categorical policy (logits ``z``) against autograd through
    the closed form, with every token weighted by its probability (the expectation over samples).
    k3's is grad KL(ref||pi), which differs: the reason k2 is the default."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    ref_lp = torch.log_softmax(torch.randn(5, dtype=torch.float64, generator=g), -1)
    lp = torch.log_softmax(z, -1)
    p = lp.exp().detach()
    reverse = torch.autograd.grad((lp.exp() * (lp - ref_lp)).sum(), z)[0]
    forward = torch.autograd.grad((ref_lp.exp() * (ref_lp - torch.log_softmax(z, -1))).sum(), z)[0]

    def expected_grad(**kw):
        tokens = torch.log_softmax(z, -1)[None, :]
        loss, _ = policy_loss("grpo", logprobs=tokens, old_logprobs=tokens.detach(),
                              advantages=torch.zeros(1, 5, dtype=torch.float64),
                              mask=p[None, :] * 5, ref_logprobs=ref_lp[None, :].expand(1, 5),
                              num_tokens=5.0, num_seqs=1.0, kl_coef=1.0, **kw)
        return torch.autograd.grad(loss, z)[0]

    torch.testing.assert_close(expected_grad(), reverse, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(expected_grad(kl_kind="k3"), forward, rtol=1e-10, atol=1e-12)
    assert (reverse - forward).abs().max() > 1e-3


# ---------------------------------------------------------------- load-time guards

GUARDS = [
    (["algo.advantage.name=future_kl_grpo", "algo.loss.name=grpo", "algo.loss.params={kl_coef: 0.1}"],
     ["algo.advantage.params.beta", "algo.loss.params.kl_coef", "counted twice"]),
    (["algo.advantage.name=reinforce_pp", "algo.advantage.params.kl_coef=0.05",
      "algo.loss.name=grpo", "algo.loss.params={kl_coef: 0.1}"],
     ["algo.advantage.params.kl_coef", "algo.loss.params.kl_coef", "counted twice"]),
    (["algo.loss.name=grpo", "algo.loss.params={kl_coef: 0.1, kl_kind: k1}"],
     ["algo.loss.params.kl_kind=k1", "pushes every sampled token down", "kl_placement=surrogate"]),
    (["algo.advantage.name=future_kl_grpo", "algo.loss.name=grpo", "algo.kl_estimator=k3"],
     ["algo.kl_estimator=k3", "set algo.kl_estimator=k1"]),
    (["algo.advantage.name=reinforce_pp", "algo.advantage.params.kl_coef=0.05",
      "algo.loss.name=grpo", "algo.kl_estimator=k2"],
     ["algo.kl_estimator=k2", "set algo.kl_estimator=k1"]),
]


@pytest.mark.parametrize("overrides,needles", GUARDS, ids=["fkl+loss", "rpp+loss", "k1-loss",
                                                           "k3-reward", "k2-reward"])
def test_kl_placements_that_cannot_work_fail_at_load_and_the_override_runs_them(overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPES / "tiny_moe_gspo.yaml", overrides)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    assert "algo.allow_unsound_kl=true" in msg
    load_config(RECIPES / "tiny_moe_gspo.yaml", overrides + ["algo.allow_unsound_kl=true"])


def test_sound_kl_placements_load():
    for overrides in (["algo.loss.name=grpo", "algo.loss.params={kl_coef: 0.1, kl_kind: k3}"],
                      ["algo.loss.name=grpo", "algo.loss.params={kl_coef: 0.1, kl_kind: k1, "
                       "kl_placement: surrogate}"],
                      ["algo.advantage.name=future_kl_grpo", "algo.advantage.params.beta=0",
                       "algo.loss.name=grpo", "algo.loss.params={kl_coef: 0.1}"],
                      ["algo.advantage.name=reinforce_pp", "algo.loss.name=grpo",
                       "algo.kl_estimator=k3"]):            # kl_coef 0: no KL in the reward
        load_config(RECIPES / "tiny_moe_gspo.yaml", overrides)


# ---------------------------------------------------------------- metrics and Clip-Cov

@pytest.mark.parametrize("dual", [None, 1.4])
def test_clipped_surrogate_metric_is_the_peers_pg_loss(b, dual):
    """verl / TRL: ``max(-A rho, -A clip(rho))``, with the dual clip ``min(., -A c)`` for A < 0."""
    el, eh = 0.1, 0.15
    params = dict(eps_low=el, eps_high=eh) if dual is None else dict(eps_low=el, eps_high=eh,
                                                                     dual_clip=dual)
    _, met = _grad(b, "grpo", **params)
    rho = torch.exp(b["lp"] - b["old"])
    a = b["adv"]
    pg = torch.maximum(-a * rho, -a * rho.clamp(1 - el, 1 + eh))
    if dual is not None:
        pg = torch.where(a < 0, torch.minimum(pg, -a * dual), pg)
    want = (pg * b["mask"]).sum() / b["mask"].sum()
    assert met["pg_loss_clipped_surrogate"].item() == pytest.approx(want.item(), rel=1e-12)
    ours = sum(-_ppo_weight(r, x, el, eh) * x for r, x, k in zip(rho.flatten().tolist(),
               a.flatten().tolist(), b["mask"].flatten().tolist()) if k) / b["mask"].sum().item()
    if dual is None:
        assert met["pg_loss"].item() == pytest.approx(ours, rel=1e-12)
    assert met["pg_loss"].item() != pytest.approx(want.item())      # they differ when clips bind


def test_clip_cov_detaches_exactly_the_reference_count_and_never_a_clipped_token():
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        cov = torch.randn(8, 30, generator=g, dtype=torch.float64)
        mask = (torch.rand(8, 30, generator=g) > 0.2).double()
        clipped = torch.rand(8, 30, generator=g) > 0.7
        ratio = [0.0, 0.01, 0.05, 0.3][trial % 4]
        sel = clip_cov_select(cov, mask, ratio=ratio, lb=-0.5, ub=1.0, exclude=clipped,
                              generator=torch.Generator().manual_seed(trial))
        cand = (mask > 0) & (cov > -0.5) & (cov < 1.0) & ~clipped
        # verl: max(int(ratio * n_tokens), 1), at most the candidates
        want = min(max(int(ratio * mask.sum().item()), 1), int(cand.sum()))
        assert int(sel.sum()) == want and not (sel & ~cand).any()


def test_clip_cov_in_the_loss_skips_tokens_the_ppo_clip_already_zeroed(b):
    big = {k: v.repeat(30, 1) if torch.is_tensor(v) and v.dim() == 2 else v for k, v in b.items()}
    big["adv"] = torch.randn(big["lp"].shape, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(5)) * big["mask"]
    kw = dict(eps_low=0.1, eps_high=0.1)
    g_plain, _ = _grad(big, "grpo", **kw)
    g, met = _grad(big, "grpo", entropy_control="clip_cov", clip_cov_ratio=0.02, clip_cov_lb=-10.0,
                   clip_cov_ub=10.0, generator=torch.Generator().manual_seed(0), **kw)
    newly = (g == 0) & (g_plain != 0)
    n = big["mask"].sum().item()
    assert int(newly.sum()) == max(int(0.02 * n), 1)          # all detached tokens are new ones
    assert met["cov_selected_frac"].item() == pytest.approx(int(newly.sum()) / n)


# ---------------------------------------------------------------- advantages

def test_future_kl_std_clipping_bounds_the_per_position_std(batch):
    beta, lo, hi = 0.5, 0.2, 0.25
    got = compute_advantages("future_kl_grpo", rewards=batch["rewards"], mask=batch["mask"],
                             group_ids=batch["group_ids"], kl=batch["kl"], beta=beta,
                             std_min=lo, std_max=hi)
    r, _ = ref.future_kl_grpo(batch["rewards"], batch["kl"], batch["mask"], batch["group_ids"], beta)
    mask, groups = ref.lists(batch["mask"]), [int(x) for x in ref.lists(batch["group_ids"])]
    want = torch.zeros_like(got)
    for i in range(len(mask)):
        for n, j in enumerate(ref.actions(mask[i])):
            peers = [r[k][ref.actions(mask[k])[n]] for k in range(len(mask))
                     if groups[k] == groups[i] and len(ref.actions(mask[k])) > n]
            if len(peers) > 1:
                std = min(max(ref._std(peers), lo), hi)
                want[i, j] = (r[i][j] - ref._mean(peers)) / (std + 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    plain = compute_advantages("future_kl_grpo", rewards=batch["rewards"], mask=batch["mask"],
                               group_ids=batch["group_ids"], kl=batch["kl"], beta=beta)
    assert not torch.allclose(plain, got)          # the clip binds on this batch


def test_step_moments_summed_over_micro_batches_whiten_like_the_whole_batch(batch):
    x = compute_advantages("reinforce_pp", rewards=batch["rewards"], mask=batch["mask"],
                           group_ids=batch["group_ids"], kl=batch["kl"], kl_coef=0.1, whiten=False)
    whole = masked_whiten(x, batch["mask"])
    parts = [slice(0, 2), slice(2, 5), slice(5, 6)]
    moments = sum(whiten_moments(x[p], batch["mask"][p]) for p in parts)
    got = torch.cat([whiten_with_moments(x[p], batch["mask"][p], moments) for p in parts])
    torch.testing.assert_close(got, whole, rtol=1e-9, atol=1e-12)
    # and unlike whitening each micro-batch on its own
    own = torch.cat([masked_whiten(x[p], batch["mask"][p]) for p in parts])
    assert not torch.allclose(own, whole)


def test_step_whitening_takes_over_each_estimators_own_whitening():
    assert step_whitening("reinforce_pp", {"kl_coef": 0.1}) == ({"kl_coef": 0.1, "whiten": False}, True)
    assert step_whitening("reinforce_pp", {"whiten": False}) == ({"whiten": False}, False)
    assert step_whitening("grpo", {}) == ({"whiten": False}, False)
    assert step_whitening("grpo", {"whiten": True}) == ({"whiten": False}, True)


# ---------------------------------------------------------------- epochs

def test_epoch_orders_keep_the_first_pass_and_reshuffle_each_later_one_from_the_seed():
    orders = epoch_orders(8, 4, seed=5, step=3)
    assert orders[0] == list(range(8))
    assert all(sorted(o) == list(range(8)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4
    assert epoch_orders(8, 4, seed=5, step=3) == orders              # a restarted step replays it
    assert epoch_orders(8, 4, seed=5, step=4) != orders
    assert epoch_orders(8, 4, seed=6, step=3) != orders
    assert epoch_orders(8, 1, seed=5, step=3) == [list(range(8))]


def test_epochs_per_step_below_one_fails_at_load_naming_the_key():
    with pytest.raises(ConfigError, match="train.epochs_per_step"):
        load_config(RECIPES / "tiny_moe_gspo.yaml", ["train.epochs_per_step=0"])
