import math

import pytest
import torch

from megatron_rl.algo.advantages import compute_advantages
from megatron_rl.algo.losses import POLICY_LOSSES, loss_params, policy_loss
from megatron_rl.algo.registry import UnknownNameError

from tests.unit import reference as ref
from tests.unit.conftest import pad


def grad_of(name, b, lp=None, **params):
    lp = (b["lp"] if lp is None else lp).detach().clone().requires_grad_()
    loss, metrics = policy_loss(name, logprobs=lp, old_logprobs=b["old"], advantages=b["adv"],
                                mask=b["mask"], num_tokens=b["mask"].sum(), num_seqs=b["mask"].shape[0],
                                **params)
    (g,) = torch.autograd.grad(loss, lp)
    return loss.detach(), g, metrics


@pytest.fixture
def b(batch):
    out = dict(batch)
    out["old"] = batch["lp"] + 0.25 * torch.randn(batch["lp"].shape, dtype=torch.float64,
                                                 generator=torch.Generator().manual_seed(7))
    out["adv"] = compute_advantages("grpo", rewards=batch["rewards"], mask=batch["mask"],
                                    group_ids=batch["group_ids"])
    return out


def weight_rule(name, rho, a, p):
    """Reference w(rho) from the definitions in ARCHITECTURE.md."""
    if name == "ppo_clip":
        el, eh = p.get("eps_low", 0.2), p.get("eps_high", 0.2)
        clipped = min(max(rho, 1 - el), 1 + eh)
        return 0.0 if (rho - clipped) * a > 0 else rho
    if name == "upper_clip":
        return min(rho, 1 + p.get("eps", 0.2))
    if name == "power":
        return rho ** p.get("q", 1.0)
    return {"none": 1.0, "full": rho}[name]


@pytest.mark.parametrize("ratio", ["token", "sequence", "future"])
@pytest.mark.parametrize("weight,wp", [("ppo_clip", {"eps_low": 0.1, "eps_high": 0.15}),
                                       ("upper_clip", {"eps": 0.1}), ("power", {"q": 0.5}),
                                       ("none", {}), ("full", {})])
def test_reinforce_form_gradient_matches_loop_reference(b, ratio, weight, wp):
    _, g, _ = grad_of("reinforce", b, ratio=ratio, weight=weight, weight_params=wp)
    lr = ref.log_ratio(ratio, b["lp"], b["old"], b["mask"])
    A, m = ref.lists(b["adv"]), ref.lists(b["mask"])
    n = sum(map(sum, m))
    for i in range(len(m)):
        for j in range(len(m[0])):
            want = 0.0
            if m[i][j] > 0:
                want = -weight_rule(weight, math.exp(lr[i][j]), A[i][j], wp) * A[i][j] / n
            assert g[i, j].item() == pytest.approx(want, abs=1e-12)
    if weight != "ppo_clip":
        assert (g[b["mask"] > 0] != 0).any()


def test_gspo_reinforce_form_equals_autograd_through_the_sequence_objective(b):
    """GSPO proper: (1/G) sum_i min(s_i A_i, clip(s_i) A_i) with s_i = exp(mean_k d_ik); its
    gradient equals GSPO-token (w = s_i on every token, 0 where the sequence clip applies)."""
    eps_low, eps_high = 0.05, 0.08
    seq_adv = torch.tensor([1.0, -0.5, 0.7, -1.2, 0.3, -0.4], dtype=torch.float64)
    b = dict(b, adv=seq_adv[:, None] * b["mask"])
    lp = b["lp"].detach().clone().requires_grad_()
    m = b["mask"]
    s = torch.exp(((lp - b["old"]) * m).sum(-1) / m.sum(-1))
    obj = torch.min(s * seq_adv, s.clamp(1 - eps_low, 1 + eps_high) * seq_adv).sum() / len(s)
    (g_ref,) = torch.autograd.grad(-obj, lp)
    clipped = ((s - s.clamp(1 - eps_low, 1 + eps_high)) * seq_adv > 0)
    assert 0 < clipped.sum() < len(s), "the test needs clipped and unclipped sequences"
    _, g, metrics = grad_of("gspo", b, eps_low=eps_low, eps_high=eps_high)
    torch.testing.assert_close(g, g_ref * m)
    want_high = (clipped & (seq_adv > 0)).to(m.dtype) @ m.sum(-1) / m.sum()
    assert metrics["clip_frac_high"].item() == pytest.approx(want_high.item())


def test_grpo_loss_equals_brute_force_ppo_with_kl_and_entropy(b):
    ent = torch.rand(b["lp"].shape, dtype=torch.float64, requires_grad=True)
    lp = b["lp"].detach().clone().requires_grad_()
    loss, _ = policy_loss("grpo", logprobs=lp, old_logprobs=b["old"], advantages=b["adv"],
                          mask=b["mask"], ref_logprobs=b["ref"], entropy=ent,
                          num_tokens=b["mask"].sum(), num_seqs=6, eps_low=0.1, eps_high=0.2,
                          kl_coef=0.05, kl_kind="k3", entropy_coef=0.01)
    g, ge = torch.autograd.grad(loss, [lp, ent])
    lp_r = b["lp"].detach().clone().requires_grad_()
    ent_r = ent.detach().clone().requires_grad_()
    total, n = 0.0, 0
    for i in range(6):
        for j in range(b["lp"].shape[1]):
            if b["mask"][i, j] == 0:
                continue
            rho = torch.exp(lp_r[i, j] - b["old"][i, j])
            a = b["adv"][i, j]
            surr = torch.min(rho * a, rho.clamp(0.9, 1.2) * a)
            log_r = b["ref"][i, j] - lp_r[i, j]
            total = total - surr + 0.05 * (torch.exp(log_r) - 1 - log_r) - 0.01 * ent_r[i, j]
            n += 1
    g_ref, ge_ref = torch.autograd.grad(total / n, [lp_r, ent_r])
    torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(ge, ge_ref)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregations_match_their_definitions(b, agg):
    loss, g, _ = grad_of("reinforce", b, weight="none", agg=agg, norm_constant=8.0)
    A, m = ref.lists(b["adv"]), ref.lists(b["mask"])
    n_tok, n_seq = sum(map(sum, m)), len(m)
    want = 0.0
    for i in range(n_seq):
        seq = sum(-A[i][j] for j in range(len(m[i])) if m[i][j] > 0)  # value of -A*exp(0)
        H = sum(m[i])
        want += {"token-mean": seq / n_tok, "seq-mean-token-mean": seq / H / n_seq,
                 "seq-mean-token-sum": seq / (n_seq * 8.0)}[agg]
    assert loss.item() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_with_global_denominators_sum_to_the_full_batch(b, name, agg):
    """The step loss is the sum of micro-batch losses when num_tokens/num_seqs are global."""
    common = dict(old_logprobs=b["old"], advantages=b["adv"], mask=b["mask"],
                  ref_logprobs=b["ref"], num_tokens=b["mask"].sum(), num_seqs=6, agg=agg)
    lp = b["lp"].detach().clone().requires_grad_()
    full, _ = policy_loss(name, logprobs=lp, **common)
    (g_full,) = torch.autograd.grad(full, lp)
    lp2 = b["lp"].detach().clone().requires_grad_()
    parts = []
    for sl in (slice(0, 2), slice(2, 5), slice(5, 6)):
        sub = {k: (v[sl] if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in common.items()}
        parts.append(policy_loss(name, logprobs=lp2[sl], **sub)[0])
    total = sum(parts)
    (g_split,) = torch.autograd.grad(total, lp2)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(g_split, g_full)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_padding_never_changes_a_loss_or_its_gradient(b, name):
    args = dict(ref_logprobs=b["ref"], rollout_logprobs=b["old"] + 0.01, tis_cap=1.5)
    base, g, met = grad_of(name, b, **args)
    pb = {k: pad(v, 3, -2.5) if torch.is_tensor(v) and v.dim() == 2 else v for k, v in b.items()}
    pb["mask"] = pad(b["mask"], 3)
    args_p = dict(ref_logprobs=pb["ref"], rollout_logprobs=pb["old"] + 0.01, tis_cap=1.5)
    loss_p, g_p, met_p = grad_of(name, pb, **args_p)
    torch.testing.assert_close(loss_p, base)
    torch.testing.assert_close(g_p[:, :-3], g)
    assert (g_p[:, -3:] == 0).all()
    for k in met:
        torch.testing.assert_close(met_p[k], met[k])


def test_truncated_is_multiplies_the_policy_gradient_weight(b):
    rollout = b["old"] + 0.4 * torch.randn(b["old"].shape, dtype=torch.float64,
                                           generator=torch.Generator().manual_seed(3))
    _, g_plain, _ = grad_of("reinforce", b, weight="full")
    _, g_tis, met = grad_of("reinforce", b, weight="full", rollout_logprobs=rollout, tis_cap=1.2)
    tis = torch.exp(b["old"] - rollout).clamp(max=1.2) * b["mask"]
    torch.testing.assert_close(g_tis, g_plain * tis)
    capped = ((torch.exp(b["old"] - rollout) > 1.2) & (b["mask"] > 0)).sum() / b["mask"].sum()
    assert met["tis_capped_frac"].item() == pytest.approx(capped.item()) and capped > 0


def test_clip_cov_detaches_only_selected_high_covariance_tokens(b):
    big = {k: v.repeat(40, 1) if torch.is_tensor(v) and v.dim() == 2 else v for k, v in b.items()}
    # nonzero advantages everywhere, so that every selected token shows in the gradient
    big["adv"] = torch.randn(big["lp"].shape, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(5)) * big["mask"]
    lb, ub, ratio = 0.05, 0.6, 0.1
    gen = torch.Generator().manual_seed(0)
    _, g_plain, _ = grad_of("reinforce", big)
    _, g, met = grad_of("reinforce", big, entropy_control="clip_cov", clip_cov_ratio=ratio,
                        clip_cov_lb=lb, clip_cov_ub=ub, generator=gen)
    m, a, lp = big["mask"], big["adv"], big["lp"]
    n = m.sum()
    cov = (a - (a * m).sum() / n) * (lp - (lp * m).sum() / n)
    cand = (m > 0) & (cov > lb) & (cov < ub)
    zeroed = (g == 0) & (g_plain != 0)
    assert (zeroed <= cand).all(), "only candidates in (lb, ub) may lose their gradient"
    torch.testing.assert_close(g[~zeroed], g_plain[~zeroed])
    # the reference's count exactly: max(int(ratio * n), 1) tokens, at most the candidates
    assert zeroed.sum().item() == min(max(int(ratio * n.item()), 1), cand.sum().item())
    assert met["cov_selected_frac"].item() == pytest.approx(zeroed.sum().item() / n.item())


def test_kl_cov_penalises_exactly_the_top_covariance_tokens(b):
    ratio, coef = 0.2, 0.7
    _, g_plain, _ = grad_of("reinforce", b)
    _, g, _ = grad_of("reinforce", b, entropy_control="kl_cov", kl_cov_ratio=ratio, kl_cov_coef=coef)
    m, a, lp = b["mask"], b["adv"], b["lp"]
    n = m.sum()
    cov = ((a - (a * m).sum() / n) * (lp - (lp * m).sum() / n)).tolist()
    cells = sorted(((cov[i][j], i, j) for i in range(6) for j in range(lp.shape[1]) if m[i, j] > 0),
                   reverse=True)
    k = max(int(ratio * n.item()), 1)
    want = g_plain.clone()
    for _, i, j in cells[:k]:
        want[i, j] += coef * math.copysign(1.0, (lp[i, j] - b["old"][i, j]).item()) / n
    torch.testing.assert_close(g, want)


def test_every_preset_runs_in_float32_and_float64(b):
    for name in POLICY_LOSSES:
        for dtype in (torch.float32, torch.float64):
            c = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in b.items()}
            loss, _, _ = grad_of(name, c)
            assert loss.dtype == dtype and torch.isfinite(loss)


def test_unknown_loss_and_parameters_are_named(b):
    with pytest.raises(UnknownNameError, match="gspo"):
        grad_of("gsp", b)
    with pytest.raises(TypeError, match="'eps_hgh'.*did you mean 'eps_high'"):
        grad_of("gspo", b, eps_hgh=0.1)
    with pytest.raises(TypeError, match="'kl_coef'"):
        grad_of("future_kl_grpo", b, kl_coef=0.1)  # the KL is in the advantages: no double count
    with pytest.raises(ValueError, match="aggregation"):
        grad_of("grpo", b, agg="sum")
    assert "tis_cap" in loss_params("gspo") and "eps_high" in loss_params("gspo")


def test_dr_gspo_is_gspo_with_token_sum_aggregation(b):
    """Dr.GSPO multiplies each sequence objective by its length H_i; its gradient equals gspo with
    the seq-mean-token-sum aggregation (norm_constant 1)."""
    eps_low, eps_high = 0.05, 0.08
    seq_adv = torch.tensor([1.0, -0.5, 0.7, -1.2, 0.3, -0.4], dtype=torch.float64)
    b = dict(b, adv=seq_adv[:, None] * b["mask"])
    lp = b["lp"].detach().clone().requires_grad_()
    m = b["mask"]
    H = m.sum(-1)
    s = torch.exp(((lp - b["old"]) * m).sum(-1) / H)
    obj = (H * torch.min(s * seq_adv, s.clamp(1 - eps_low, 1 + eps_high) * seq_adv)).sum() / len(s)
    (g_ref,) = torch.autograd.grad(-obj, lp)
    _, g, _ = grad_of("gspo", b, eps_low=eps_low, eps_high=eps_high, agg="seq-mean-token-sum")
    torch.testing.assert_close(g, g_ref * m)


def test_approx_kl_is_the_k3_estimate_of_kl_old_to_new_over_the_steps_tokens(b):
    """A loop over tokens: (r - 1) - log r with r = p_new / p_old, mean over action tokens."""
    _, _, metrics = grad_of("grpo", b)
    want, n = 0.0, 0
    for i in range(b["lp"].shape[0]):
        for j in range(b["lp"].shape[1]):
            if b["mask"][i, j] > 0:
                d = float(b["lp"][i, j] - b["old"][i, j])
                want, n = want + (math.exp(d) - 1 - d), n + 1
    assert metrics["approx_kl"].item() == pytest.approx(want / n, rel=1e-9) and want > 0
    _, _, same = grad_of("grpo", dict(b, old=b["lp"].detach()))
    assert same["approx_kl"].item() == 0.0
