"""Environment (tool) tokens are never actions: whatever their content, no advantage, loss,
gradient or metric changes, for every estimator and every loss. The fixture's batch has tool tokens
inside responses 0 and 5; here every per-token input at those slots is replaced by large noise."""

from __future__ import annotations

import pytest
import torch

from megatron_rl.algo.advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from megatron_rl.algo.losses import POLICY_LOSSES, policy_loss

PER_TOKEN = ("kl", "values", "lp", "old", "ref")


def _env_slots(mask):
    """Masked slots with an action token after them: tool output inside a response."""
    later = mask.flip(-1).cumsum(-1).flip(-1) - mask
    return (mask == 0) & (later > 0)


def _perturbed(batch, seed):
    env = _env_slots(batch["mask"])
    assert env.sum() == 2
    g = torch.Generator().manual_seed(seed)
    out = dict(batch)
    for k in PER_TOKEN:
        noise = torch.randn(batch[k].shape, generator=g, dtype=batch[k].dtype) * 50
        out[k] = torch.where(env, noise, batch[k])
    return out, env


def _adv(name, b):
    params = {"kl_coef": 0.1} if name in ("reinforce_pp", "gae") else {}
    return compute_advantages(name, rewards=b["rewards"], mask=b["mask"], group_ids=b["group_ids"],
                              kl=b["kl"], values=b["values"], **params)


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_environment_token_content_changes_no_advantage(batch, name):
    base = _adv(name, batch)
    for seed in range(3):
        b, env = _perturbed(batch, seed)
        got = _adv(name, b)
        torch.testing.assert_close(got, base, rtol=0, atol=1e-12)
        assert (got[env] == 0).all()


def _loss(name, b, adv):
    lp = b["lp"].detach().clone().requires_grad_()
    loss, metrics = policy_loss(name, logprobs=lp, old_logprobs=b["old"], advantages=adv,
                                mask=b["mask"], num_tokens=b["mask"].sum(),
                                num_seqs=b["mask"].shape[0], ref_logprobs=b["ref"],
                                rollout_logprobs=b["old"] + 0.01, tis_cap=1.5,
                                entropy=-b["lp"].detach() * 0.5)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, {k: v.detach() for k, v in metrics.items()}


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_environment_token_content_changes_no_loss_gradient_or_metric(batch, name):
    estimator = "future_kl_grpo" if name == "future_kl_grpo" else "grpo"
    base_adv = _adv(estimator, batch)
    loss, grad, metrics = _loss(name, batch, base_adv)
    for seed in range(3):
        b, env = _perturbed(batch, seed)
        # advantages recomputed from the perturbed inputs, and also garbage advantages there
        adv = torch.where(env, torch.full_like(base_adv, 1e3), _adv(estimator, b))
        loss_p, grad_p, metrics_p = _loss(name, b, adv)
        torch.testing.assert_close(loss_p, loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad_p, grad, rtol=1e-12, atol=1e-12)
        assert (grad_p[env] == 0).all()
        assert metrics_p.keys() == metrics.keys()
        for k in metrics:
            torch.testing.assert_close(metrics_p[k], metrics[k], rtol=1e-12, atol=1e-12, msg=k)
