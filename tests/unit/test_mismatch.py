"""The train/inference mismatch corrections (``algo.mismatch``) against float64 loops over their
definitions, and what each one does to the policy gradient."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rl.algo.losses import policy_loss
from megatron_rl.algo.mismatch import mismatch_correction, mismatch_gap

B, T = 6, 7


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 5:] = 0
    mask[2, :2] = 0          # environment tokens inside a response
    mask[3, :] = 0           # a response with no action token
    old = -torch.rand(B, T, dtype=torch.float64, generator=g) * 3
    roll = old + 0.6 * torch.randn(B, T, dtype=torch.float64, generator=g)
    return old, roll, mask


def _rho(old, roll):
    return [[math.exp(o - r) for o, r in zip(orow, rrow)] for orow, rrow in zip(old.tolist(), roll.tolist())]


def _reference(old, roll, mask, *, tis_cap=None, icepop=None, mis=None, tr_max_kl=None):
    """One sequence, one token at a time, straight from the definitions."""
    rho, m = _rho(old, roll), mask.tolist()
    out = []
    for i in range(len(m)):
        acts = [j for j in range(len(m[i])) if m[i][j] > 0]
        geo = math.exp(sum(math.log(rho[i][j]) for j in acts) / len(acts)) if acts else 1.0
        worst = max((rho[i][j] - 1 - math.log(rho[i][j]) for j in acts), default=-math.inf)
        row = []
        for j in range(len(m[i])):
            if m[i][j] == 0:
                row.append(0.0)
                continue
            w = 1.0
            if tis_cap is not None:
                w *= min(rho[i][j], tis_cap)
            if icepop is not None and not icepop[0] <= rho[i][j] <= icepop[1]:
                w = 0.0
            if mis is not None and not mis[0] <= geo <= mis[1]:
                w = 0.0
            if tr_max_kl is not None and worst > tr_max_kl:
                w = 0.0
            row.append(w)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


SETTINGS = {
    "tis": dict(tis_cap=1.5),
    "icepop": dict(icepop=(0.7, 1.4)),
    "mis": dict(mis=(0.8, 1.25)),
    "tr": dict(tr_max_kl=0.15),
    "all": dict(tis_cap=2.0, icepop=(0.5, 2.0), mis=(0.7, 1.4), tr_max_kl=0.3),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_each_correction_equals_its_definition(case, name):
    old, roll, mask = case
    got = mismatch_correction(old, roll, mask, **SETTINGS[name])
    want = _reference(old, roll, mask, **SETTINGS[name])
    torch.testing.assert_close(got.w, want)
    # every correction acts on this batch (a test of a correction that changes nothing proves little)
    assert ((want != 1) & (mask > 0)).any() and (want[mask > 0] > 0).any()


@pytest.mark.parametrize("name", ["icepop", "mis", "tr"])
def test_masked_fraction_counts_the_action_tokens_a_mask_dropped(case, name):
    old, roll, mask = case
    got = mismatch_correction(old, roll, mask, **SETTINGS[name])
    want = _reference(old, roll, mask, **SETTINGS[name])
    flags = got.flags[f"{name}_masked"]
    assert torch.equal(flags, (want == 0) & (mask > 0))


def test_no_correction_configured_returns_none(case):
    assert mismatch_correction(*case) is None


def test_a_correction_scales_the_policy_gradient_token_by_token(case):
    old, roll, mask = case
    lp = old.clone().requires_grad_()
    adv = torch.randn(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * mask
    grads = []
    for extra in ({}, SETTINGS["all"]):
        lp.grad = None
        loss, metrics = policy_loss("reinforce", logprobs=lp, old_logprobs=old, advantages=adv,
                                    mask=mask, rollout_logprobs=roll, num_tokens=mask.sum(),
                                    num_seqs=B, weight="full", **extra)
        loss.backward()
        grads.append(lp.grad.clone())
    torch.testing.assert_close(grads[1], grads[0] * _reference(old, roll, mask, **SETTINGS["all"]))
    assert {"tis_capped_frac", "icepop_masked_frac", "mis_masked_frac", "tr_masked_frac"} <= set(metrics)


def test_gap_metrics_are_the_k1_and_k3_estimates_per_token(case):
    old, roll, mask = case
    gap = mismatch_gap(old, roll, mask)
    rho = _rho(old, roll)
    for i in range(B):
        for j in range(T):
            on = bool(mask[i, j] > 0)
            k1 = float(roll[i, j] - old[i, j]) if on else 0.0
            assert float(gap["k1"][i, j]) == pytest.approx(k1, abs=1e-12)
            k3 = rho[i][j] - 1 - math.log(rho[i][j]) if on else 0.0
            assert float(gap["k3"][i, j]) == pytest.approx(k3, abs=1e-12)


@pytest.mark.parametrize("bad", [dict(icepop=(1.2, 2.0)), dict(mis=(0.5,)), dict(tr_max_kl=0.0)])
def test_impossible_bounds_are_refused_naming_the_parameter(case, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        mismatch_correction(*case, **bad)
