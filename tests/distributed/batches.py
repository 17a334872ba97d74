"""Synthetic RL micro-batches, their layouts (BSHD / THD) and the single-process reference.

A micro-batch is a list of sequences (prompt + response, tool tokens masked inside some responses),
held per sequence, independent of any layout. ``layout_tensors`` lays it out as a trainer would
(pad or pack, shift labels and masks, then shard); ``reference_step`` computes the loss and the
logits gradients of a whole step in one process on response-aligned ``[B, T]`` tensors, with the
plain ``megatron_rl.algo`` functions and a full-vocabulary ``log_softmax``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

from megatron_rl.algo.advantages import compute_advantages
from megatron_rl.algo.losses import policy_loss
from megatron_rl.parallel.cp_layout import bshd_shard, padded_length, shift_left, thd_shard

V = 12  # vocabulary (split over TP=2 as 6 + 6)


@dataclass
class Seq:
    prompt_len: int
    resp_len: int
    env: Sequence[int] = ()  # response positions that are tool output (mask 0)

    @property
    def n(self) -> int:
        return self.prompt_len + self.resp_len


@dataclass
class MicroBatch:
    seqs: List[Seq]
    group_of_seq: List[int]
    rewards: torch.Tensor
    tokens: List[torch.Tensor]       # [n_b]
    logits: List[torch.Tensor]       # [n_b, V] float64; row p predicts token p+1
    old: List[torch.Tensor]          # [n_b] label coordinates (row p is about token p+1)
    ref: List[torch.Tensor]
    rollout: List[torch.Tensor]

    def loss_mask_tokens(self, b: int) -> torch.Tensor:
        s = self.seqs[b]
        m = torch.zeros(s.n, dtype=torch.float64)
        m[s.prompt_len:] = 1
        for j in s.env:
            m[s.prompt_len + j] = 0
        return m


SHAPES = [
    # (group sizes/prompt lens, response lengths, env positions by sequence index)
    ([(3, 2), (3, 5)], [4, 7, 1, 9, 3, 6], {1: (2, 3), 3: (0,)}),
    ([(2, 9), (2, 1), (2, 4)], [2, 11, 5, 1, 8, 8], {2: (1,)}),
    ([(4, 6)], [3, 1, 12, 5], {2: (4, 5, 6)}),
    # long prompts, one-token responses: with CP every response token sits in the last chunk, so
    # most CP ranks hold none of this micro-batch's action tokens
    ([(3, 15), (3, 15)], [1, 1, 1, 1, 1, 1], {}),
]


def make_micro_batches(seed: int = 0) -> List[MicroBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for groups, resp_lens, env in SHAPES:
        seqs, group_of_seq = [], []
        for gid, (size, plen) in enumerate(groups):
            for _ in range(size):
                i = len(seqs)
                seqs.append(Seq(plen, resp_lens[i], env.get(i, ())))
                group_of_seq.append(gid)
        B = len(seqs)
        rewards = torch.rand(B, generator=g, dtype=torch.float64)
        if len(out) == len(SHAPES) - 1:
            rewards[: groups[0][0]] = 1.0  # a group that all succeeded: zero std, no signal
        tokens = [torch.randint(0, V, (s.n,), generator=g) for s in seqs]
        logits = [torch.randn(s.n, V, generator=g, dtype=torch.float64) * 2 for s in seqs]
        cur = [_label_logprobs(lg, t).detach() for lg, t in zip(logits, tokens)]
        old = [c + 0.05 * torch.randn(c.shape, generator=g, dtype=torch.float64) for c in cur]
        ref = [c + 0.3 * torch.randn(c.shape, generator=g, dtype=torch.float64) for c in cur]
        rollout = [o + 0.02 * torch.randn(o.shape, generator=g, dtype=torch.float64) for o in old]
        out.append(MicroBatch(seqs, group_of_seq, rewards, tokens, logits, old, ref, rollout))
    return out


def _label_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[n]``: row p is log p(token p+1); the last row (no next token) is 0."""
    lp = torch.log_softmax(logits[:-1], -1).gather(1, tokens[1:, None]).squeeze(1)
    return torch.cat([lp, lp.new_zeros(1)])


# ---------------------------------------------------------------- layouts (what a trainer does)

def padded_lengths(mb: MicroBatch, layout: str, cp: int) -> List[int]:
    """BSHD: one length for the batch; THD: per sequence; THD-aligned: per group (its max)."""
    if layout == "bshd":
        S = padded_length(max(s.n for s in mb.seqs), cp)
        return [S] * len(mb.seqs)
    if layout == "thd":
        return [padded_length(s.n, cp) for s in mb.seqs]
    group_max: Dict[int, int] = {}
    for s, gid in zip(mb.seqs, mb.group_of_seq):
        group_max[gid] = max(group_max.get(gid, 0), s.n)
    return [padded_length(group_max[gid], cp) for gid in mb.group_of_seq]


def _place(mb: MicroBatch, per_seq: List[torch.Tensor], lens: List[int], layout: str):
    """Per-sequence ``[n_b, ...]`` tensors -> BSHD ``[B, S, ...]`` or THD ``[T, ...]`` (zeros in the
    padding)."""
    tail = per_seq[0].shape[1:]
    if layout == "bshd":
        out = per_seq[0].new_zeros(len(per_seq), lens[0], *tail)
        for b, x in enumerate(per_seq):
            out[b, : x.shape[0]] = x
        return out
    out = per_seq[0].new_zeros(sum(lens), *tail)
    start = 0
    for x, n in zip(per_seq, lens):
        out[start: start + x.shape[0]] = x
        start += n
    return out


def layout_tensors(mb: MicroBatch, layout: str, cp: int, cp_rank: int, per_seq_logits=None):
    """This CP rank's share of everything: labels, loss mask, old/ref/rollout log-probs, logits.

    Returns ``(cu_seqlens_padded or None, seq_len or None, dict of local tensors)``.
    ``per_seq_logits`` replaces ``mb.logits`` (e.g. reference gradients to shard the same way).
    """
    lens = padded_lengths(mb, layout, cp)
    bshd = layout == "bshd"
    cu = None if bshd else [0] + torch.tensor(lens).cumsum(0).tolist()
    dim = 1 if bshd else 0
    tokens = _place(mb, mb.tokens, lens, layout)
    mask = _place(mb, [mb.loss_mask_tokens(b) for b in range(len(mb.seqs))], lens, layout)
    full = {
        "labels": shift_left(tokens, dim, cu),
        "mask": shift_left(mask, dim, cu),
        "old": _place(mb, mb.old, lens, layout),
        "ref": _place(mb, mb.ref, lens, layout),
        "rollout": _place(mb, mb.rollout, lens, layout),
        "logits": _place(mb, per_seq_logits or mb.logits, lens, layout),
    }
    if bshd:
        local = {k: bshd_shard(v, cp, cp_rank, dim=1) for k, v in full.items()}
    else:
        local = {k: thd_shard(v, cu, cp, cp_rank, dim=0) for k, v in full.items()}
    return cu, (lens[0] if bshd else None), local


# ---------------------------------------------------------------- the single-process reference

def response_aligned(mb: MicroBatch, per_seq: List[torch.Tensor]) -> torch.Tensor:
    """``[B, T]``: column j = response token j (label row ``prompt_len - 1 + j``); 0 past the end."""
    T = max(s.resp_len for s in mb.seqs)
    rows = []
    for s, x in zip(mb.seqs, per_seq):
        r = x[s.prompt_len - 1: s.prompt_len - 1 + s.resp_len]
        rows.append(torch.cat([r, r.new_zeros(T - s.resp_len)]))
    return torch.stack(rows)


def response_mask(mb: MicroBatch) -> torch.Tensor:
    T = max(s.resp_len for s in mb.seqs)
    m = torch.zeros(len(mb.seqs), T, dtype=torch.float64)
    for b, s in enumerate(mb.seqs):
        m[b, : s.resp_len] = 1
        for j in s.env:
            m[b, j] = 0
    return m


def step_counts(mbs: Sequence[MicroBatch]):
    masks = [response_mask(mb) for mb in mbs]
    return sum(m.sum() for m in masks), sum(float((m.sum(-1) > 0).sum()) for m in masks)


def _reference_advantages(mbs: Sequence[MicroBatch], case):
    """Each micro-batch's advantages; a ``step_whiten`` case whitens them all together: the
    mean and biased variance of every action token of the step."""
    params = dict(case.adv_params)
    whiten = getattr(case, "step_whiten", False)
    if whiten:
        whiten = params.pop("whiten", case.adv == "reinforce_pp")
        params["whiten"] = False
    advs, masks = [], []
    for mb in mbs:
        ra = lambda xs: response_aligned(mb, xs)
        mask = response_mask(mb)
        old, ref = ra(mb.old), ra(mb.ref)
        advs.append(compute_advantages(case.adv, rewards=mb.rewards, mask=mask,
                                       group_ids=torch.tensor(mb.group_of_seq),
                                       kl=(old - ref) * mask, **params))
        masks.append(mask)
    if not whiten:
        return advs
    values = torch.cat([a[m > 0] for a, m in zip(advs, masks)])
    mean, var = values.mean(), values.var(unbiased=False)
    return [(a - mean) / torch.sqrt(var + 1e-8) * m for a, m in zip(advs, masks)]


def reference_step(mbs: Sequence[MicroBatch], case):
    """``(loss, metrics, grads)`` of one optimizer step over ``mbs`` in one process; ``grads[i][b]``
    is d(step loss)/d(logits of sequence b of micro-batch i), ``[n_b, V]``."""
    num_tokens, num_seqs = step_counts(mbs)
    total, metrics, grads = 0.0, {}, []
    advs = _reference_advantages(mbs, case)
    for mb, adv in zip(mbs, advs):
        leaves = [lg.clone().requires_grad_() for lg in mb.logits]
        lp_seq, ent_seq = [], []
        for lg, t in zip(leaves, mb.tokens):
            ls = torch.log_softmax(lg[:-1], -1)
            lp = ls.gather(1, t[1:, None]).squeeze(1)
            ent = -(ls.exp() * ls).sum(-1)
            lp_seq.append(torch.cat([lp, lp.new_zeros(1)]))
            ent_seq.append(torch.cat([ent, ent.new_zeros(1)]))
        ra = lambda xs: response_aligned(mb, xs)
        mask = response_mask(mb)
        old, ref, rollout = ra(mb.old), ra(mb.ref), ra(mb.rollout)
        loss, m = policy_loss(case.loss, logprobs=ra(lp_seq), old_logprobs=old, advantages=adv,
                              mask=mask, num_tokens=num_tokens, num_seqs=num_seqs,
                              ref_logprobs=ref if case.use_ref else None,
                              rollout_logprobs=rollout if case.use_rollout else None,
                              entropy=ra(ent_seq), **case.loss_params)
        grads.append(list(torch.autograd.grad(loss, leaves)))
        total = total + loss.detach()
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v.detach()
    return total, metrics, grads
