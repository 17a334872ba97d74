import pytest
import torch

from megatron_rl.algo.advantages import (
    ADVANTAGE_ESTIMATORS, FUTURE_KL_STD_MIN, compute_advantages, future_kl_returns,
)
from megatron_rl.algo.registry import UnknownNameError

from tests.unit import reference as ref
from tests.unit.conftest import insert_env_tokens, pad


def close(got, want, tol=1e-9):
    torch.testing.assert_close(got, torch.tensor(want, dtype=got.dtype), atol=tol, rtol=tol)


def adv(name, b, **params):
    return compute_advantages(name, rewards=b["rewards"], mask=b["mask"], group_ids=b["group_ids"],
                              kl=b["kl"], values=b["values"], **params)


@pytest.mark.parametrize("params", [
    {}, {"norm_by_std": False}, {"std_min": 0.6}, {"std_max": 0.1}, {"eps": 0.5},
])
def test_grpo_matches_loop_reference(batch, params):
    want = ref.grpo(batch["rewards"], batch["mask"], batch["group_ids"],
                    norm=params.get("norm_by_std", True), eps=params.get("eps", 1e-6),
                    std_min=params.get("std_min"), std_max=params.get("std_max"))
    close(adv("grpo", batch, **params), want)


def test_dr_grpo_is_grpo_without_std(batch):
    close(adv("dr_grpo", batch), ref.grpo(batch["rewards"], batch["mask"], batch["group_ids"], norm=False))


def test_group_of_one_response_gets_zero_advantage(batch):
    b = dict(batch, group_ids=torch.tensor([0, 0, 0, 1, 1, 2]))
    for name in ("grpo", "rloo", "future_kl_grpo"):
        assert (adv(name, b)[5] == 0).all(), name


def test_rloo_matches_leave_one_out_reference(batch):
    close(adv("rloo", batch), ref.rloo(batch["rewards"], batch["mask"], batch["group_ids"]))


@pytest.mark.parametrize("gamma,kl_coef", [(1.0, 0.0), (1.0, 0.1), (0.9, 0.2)])
def test_reinforce_pp_matches_reference_returns_whitened(batch, gamma, kl_coef):
    rets = ref.returns(batch["rewards"], batch["kl"], batch["mask"], kl_coef, gamma)
    want = ref.whiten(rets, ref.lists(batch["mask"]))
    close(adv("reinforce_pp", batch, gamma=gamma, kl_coef=kl_coef), want)


def test_reinforce_pp_group_baseline_subtracts_group_mean_first(batch):
    r = batch["rewards"]
    centred = r - torch.stack([r[batch["group_ids"] == g].mean() for g in batch["group_ids"]])
    rets = ref.returns(centred, batch["kl"], batch["mask"], 0.0, 1.0)
    close(adv("reinforce_pp", batch, baseline="group"), ref.whiten(rets, ref.lists(batch["mask"])))


@pytest.mark.parametrize("gamma,lam,kl_coef", [(1.0, 1.0, 0.0), (0.99, 0.95, 0.1), (0.5, 0.0, 0.0)])
def test_gae_matches_loop_reference(batch, gamma, lam, kl_coef):
    want = ref.gae(batch["rewards"], batch["values"], batch["kl"], batch["mask"], gamma, lam, kl_coef)
    close(adv("gae", batch, gamma=gamma, lam=lam, kl_coef=kl_coef, whiten=False), want)
    close(adv("gae", batch, gamma=gamma, lam=lam, kl_coef=kl_coef),
          ref.whiten(want, ref.lists(batch["mask"])))


@pytest.mark.parametrize("norm,std_min", [(True, 0.0), (False, 0.0), (True, 0.1), (True, 0.5)])
def test_future_kl_grpo_matches_per_position_group_reference(batch, norm, std_min):
    r, want = ref.future_kl_grpo(batch["rewards"], batch["kl"], batch["mask"], batch["group_ids"],
                                 beta=0.3, norm=norm, std_min=std_min)
    close(future_kl_returns(batch["rewards"], batch["kl"], batch["mask"], 0.3), r)
    close(adv("future_kl_grpo", batch, beta=0.3, norm_by_std=norm, std_min=std_min), want)


def test_future_kl_grpo_std_floor_keeps_kl_noise_small_where_rewards_agree():
    """The default floor (``FUTURE_KL_STD_MIN``): a group whose rewards agree differs only by its
    KL sums; without a floor that noise is scaled up to advantages near +-1, with it they stay
    at (spread / floor). A group whose rewards differ keeps its advantages."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(8, 5, dtype=torch.float64)
    kl = 0.01 * torch.rand(8, 5, dtype=torch.float64, generator=g)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    floor = compute_advantages("future_kl_grpo", rewards=rewards, mask=mask, group_ids=ids, kl=kl)
    bare = compute_advantages("future_kl_grpo", rewards=rewards, mask=mask, group_ids=ids, kl=kl,
                              std_min=0.0)
    assert FUTURE_KL_STD_MIN == 0.1
    assert bare[:4].abs().max() > 0.9 and floor[:4].abs().max() < 0.01
    torch.testing.assert_close(floor[4:], bare[4:])


def test_future_kl_returns_equal_gae_with_unit_discounts_and_zero_values(batch):
    """The seed's identity: r_j = R - beta/H sum_{k>=j} K_k is GAE(gamma=lambda=1, V=0) with
    per-step reward -beta/H * K_k and R at the last action token."""
    beta, mask = 0.3, batch["mask"]
    H = mask.sum(-1, keepdim=True)
    via_gae = compute_advantages("gae", rewards=batch["rewards"], mask=mask,
                                 group_ids=batch["group_ids"], kl=batch["kl"] / H,
                                 values=torch.zeros_like(mask), gamma=1.0, lam=1.0,
                                 kl_coef=beta, whiten=False)
    torch.testing.assert_close(future_kl_returns(batch["rewards"], batch["kl"], mask, beta), via_gae)


def test_future_kl_grpo_action_index_with_one_response_gets_zero(batch):
    # response 5 is the only one of group 1 with a 5th and 6th action (columns 5 and 6: its
    # environment token at column 2 shifts them), although response 4 is valid up to column 3
    a = adv("future_kl_grpo", batch, beta=0.1)
    assert batch["mask"][5].sum() == 6 and batch["mask"][3:5].sum(-1).max() == 4
    assert a[5, 5] == 0 and a[5, 6] == 0 and a[5, 4] != 0


def test_future_kl_grpo_pools_by_action_index_not_column(batch):
    """Response 0's 4th action sits at column 4 (a tool token at column 3): its statistics pool
    with the 4th actions of responses 1 and 2 (column 3), so shifting response 0's tokens after
    the tool token by one column changes nothing."""
    a = adv("future_kl_grpo", batch, beta=0.3)
    shifted = {k: v.clone() for k, v in batch.items()}
    for k in ("mask", "kl"):    # move response 0's environment token from column 3 to column 1
        row = batch[k][0]
        shifted[k][0] = torch.cat([row[:1], row[3:4], row[1:3], row[4:]])
    b = adv("future_kl_grpo", shifted, beta=0.3)
    keep = batch["mask"][0] > 0
    torch.testing.assert_close(b[0][shifted["mask"][0] > 0], a[0][keep])
    torch.testing.assert_close(b[1:], a[1:])


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_padding_never_changes_advantages(batch, name):
    params = {"kl_coef": 0.1} if name in ("reinforce_pp", "gae") else {}
    base = adv(name, batch, **params)
    padded = {k: (pad(v, 3, 0.7) if k in ("kl", "values", "lp", "old", "ref") else v)
              for k, v in batch.items()}
    padded["mask"] = pad(batch["mask"], 3)
    torch.testing.assert_close(adv(name, padded, **params)[:, :-3], base)
    assert (adv(name, padded, **params)[:, -3:] == 0).all()


@pytest.mark.parametrize("name", ["future_kl_grpo", "gae", "reinforce_pp"])
def test_environment_tokens_are_outside_every_sum(batch, name):
    """Inserting masked tool-output tokens mid-response (with arbitrary KL/values there) leaves
    the advantages of the action tokens unchanged: they count neither in sums nor in H."""
    params = {"kl_coef": 0.1} if name != "future_kl_grpo" else {}
    base = adv(name, batch, **params)
    b = {k: insert_env_tokens(v, 2, 2, 5.0) if k in ("kl", "values") else v for k, v in batch.items()}
    b["mask"] = insert_env_tokens(batch["mask"], 2, 2, 0.0)
    got = adv(name, b, **params)
    torch.testing.assert_close(torch.cat([got[:, :2], got[:, 4:]], 1), base)


def test_advantages_carry_no_gradient(batch):
    kl = batch["kl"].clone().requires_grad_()
    out = compute_advantages("future_kl_grpo", rewards=batch["rewards"], mask=batch["mask"],
                             group_ids=batch["group_ids"], kl=kl)
    assert not out.requires_grad


def test_unknown_estimator_and_parameter_are_named():
    with pytest.raises(UnknownNameError, match="grpo"):
        compute_advantages("grpoo", rewards=torch.zeros(2), mask=torch.ones(2, 1),
                           group_ids=torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="'betta'.*did you mean 'beta'"):
        compute_advantages("future_kl_grpo", rewards=torch.zeros(2), mask=torch.ones(2, 1),
                           group_ids=torch.zeros(2, dtype=torch.long), kl=torch.zeros(2, 1), betta=1)


def test_estimators_that_need_kl_or_values_say_so():
    args = dict(rewards=torch.zeros(2), mask=torch.ones(2, 1), group_ids=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="needs kl"):
        compute_advantages("future_kl_grpo", **args)
    with pytest.raises(ValueError, match="needs values"):
        compute_advantages("gae", **args)
