"""Brute-force float64 references written with plain Python loops over lists.

They share no code with megatron_rl.algo: each follows the definition in ARCHITECTURE.md
literally, one sequence and one position at a time, so a vectorisation slip cannot hide in both.
Inputs are nested lists (or tensors, converted); outputs are nested lists.
"""

from __future__ import annotations

import math


def lists(t):
    return t.double().tolist() if hasattr(t, "tolist") else t


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs, unbiased=True):
    if len(xs) < 2:
        return 0.0
    mu = _mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - (1 if unbiased else 0)))


def actions(mask_row):
    return [j for j, m in enumerate(mask_row) if m > 0]


def grpo(rewards, mask, groups, norm=True, eps=1e-6, std_min=None, std_max=None):
    rewards, mask, groups = lists(rewards), lists(mask), [int(g) for g in lists(groups)]
    out = []
    for i, r in enumerate(rewards):
        members = [rewards[k] for k in range(len(rewards)) if groups[k] == groups[i]]
        a = 0.0
        if len(members) > 1:
            a = r - _mean(members)
            if norm:
                s = _std(members)
                if std_min is not None:
                    s = max(s, std_min)
                if std_max is not None:
                    s = min(s, std_max)
                a /= s + eps
        out.append([a if m > 0 else 0.0 for m in mask[i]])
    return out


def rloo(rewards, mask, groups):
    rewards, mask, groups = lists(rewards), lists(mask), [int(g) for g in lists(groups)]
    out = []
    for i, r in enumerate(rewards):
        others = [rewards[k] for k in range(len(rewards)) if groups[k] == groups[i] and k != i]
        a = r - _mean(others) if others else 0.0
        out.append([a if m > 0 else 0.0 for m in mask[i]])
    return out


def step_rewards(reward, kl_row, mask_row, kl_coef):
    """Per-action-step rewards of one response, in order: -kl_coef*kl, plus R on the last."""
    idx = actions(mask_row)
    rs = [-kl_coef * kl_row[j] for j in idx]
    if rs:
        rs[-1] += reward
    return idx, rs


def returns(rewards, kl, mask, kl_coef, gamma):
    rewards, kl, mask = lists(rewards), lists(kl), lists(mask)
    out = []
    for i in range(len(rewards)):
        idx, rs = step_rewards(rewards[i], kl[i], mask[i], kl_coef)
        row = [0.0] * len(mask[i])
        for a, j in enumerate(idx):
            row[j] = sum(gamma ** (b - a) * rs[b] for b in range(a, len(rs)))
        out.append(row)
    return out


def whiten(x, mask, eps=1e-8):
    vals = [x[i][j] for i in range(len(x)) for j in range(len(x[i])) if mask[i][j] > 0]
    mu = _mean(vals)
    var = sum((v - mu) ** 2 for v in vals) / len(vals)
    return [[(x[i][j] - mu) / math.sqrt(var + eps) if mask[i][j] > 0 else 0.0
             for j in range(len(x[i]))] for i in range(len(x))]


def gae(rewards, values, kl, mask, gamma, lam, kl_coef):
    rewards, values, kl, mask = lists(rewards), lists(values), lists(kl), lists(mask)
    out = []
    for i in range(len(rewards)):
        idx, rs = step_rewards(rewards[i], kl[i], mask[i], kl_coef)
        vs = [values[i][j] for j in idx]
        row = [0.0] * len(mask[i])
        for a, j in enumerate(idx):
            total = 0.0
            for b in range(a, len(idx)):
                v_next = vs[b + 1] if b + 1 < len(idx) else 0.0
                delta = rs[b] + gamma * v_next - vs[b]
                total += (gamma * lam) ** (b - a) * delta
            row[j] = total
        out.append(row)
    return out


def future_kl_grpo(rewards, kl, mask, groups, beta, norm=True, eps=1e-6, std_min=None):
    rewards, kl, mask, groups = lists(rewards), lists(kl), lists(mask), [int(g) for g in lists(groups)]
    B, T = len(mask), len(mask[0])
    r = [[0.0] * T for _ in range(B)]
    for i in range(B):
        H = len(actions(mask[i]))
        for j in actions(mask[i]):
            r[i][j] = rewards[i] - beta / H * sum(kl[i][k] for k in actions(mask[i]) if k >= j)
    # the n-th action of a response is pooled with the n-th action of its group's other
    # responses, wherever environment tokens put it (the formulation indexes actions, not columns)
    out = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for n, j in enumerate(actions(mask[i])):
            peers = [r[k][actions(mask[k])[n]] for k in range(B)
                     if groups[k] == groups[i] and len(actions(mask[k])) > n]
            if len(peers) < 2:
                continue
            a = r[i][j] - _mean(peers)
            std = _std(peers) if std_min is None else max(_std(peers), std_min)
            out[i][j] = a / (std + eps) if norm else a
    return r, out


def log_ratio(kind, lp, old, mask):
    lp, old, mask = lists(lp), lists(old), lists(mask)
    out = []
    for i in range(len(lp)):
        idx = actions(mask[i])
        d = {j: lp[i][j] - old[i][j] for j in idx}
        row = [0.0] * len(lp[i])
        for j in idx:
            if kind == "token":
                row[j] = d[j]
            elif kind == "sequence":
                row[j] = sum(d.values()) / len(idx)
            else:
                later = [d[k] for k in idx if k >= j]
                row[j] = sum(later) / len(later)
        out.append(row)
    return out
