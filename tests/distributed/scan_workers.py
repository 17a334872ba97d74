"""Discounted scans over CP shards (``CPSeqOps.linear_suffix_scan``): REINFORCE++ returns with
``gamma < 1`` and GAE, computed on each rank's ``[B, 2C]`` view, against the single-process
estimators on each whole sequence (float64), in BSHD and THD, at CP 2 and CP 4."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_rl.algo.advantages import compute_advantages
from megatron_rl.parallel.cp_layout import CPShard, shift_left
from megatron_rl.parallel.groups import build_groups
from megatron_rl.parallel.loss import prepare_micro_batch, sharded_advantages
from tests.distributed.batches import layout_tensors, make_micro_batches

CASES = {
    "returns": ("reinforce_pp", {"gamma": 0.9, "kl_coef": 0.1, "whiten": False}),
    "gae": ("gae", {"gamma": 0.95, "lam": 0.8, "kl_coef": 0.1, "whiten": False}),
    "gae_gamma1": ("gae", {"gamma": 1.0, "lam": 0.7, "whiten": False}),
}


def _per_sequence(mb, b, name, params):
    """The estimator on sequence ``b`` alone, in label coordinates ``[n]``."""
    mask = shift_left(mb.loss_mask_tokens(b), 0)[None]
    old, ref = mb.old[b][None], mb.ref[b][None]
    return compute_advantages(name, rewards=mb.rewards[b:b + 1], mask=mask,
                              group_ids=torch.zeros(1, dtype=torch.long),
                              kl=(old - ref) * mask, values=old, **params)[0]


def scan_equivalence(rank: int, world: int) -> dict:
    mbs = make_micro_batches(seed=3)
    out = {}
    for cp in (2, 4):
        groups = build_groups(1, cp, world // cp)
        for layout in ("bshd", "thd"):
            for case, (name, params) in CASES.items():
                err = torch.zeros(1, dtype=torch.float64)
                for mb in mbs:
                    want = [_per_sequence(mb, b, name, params)[:, None] for b in range(len(mb.seqs))]
                    cu, S, local = layout_tensors(mb, layout, cp, groups.cp_rank, per_seq_logits=want)
                    shard = (CPShard.bshd(len(mb.seqs), S, cp, groups.cp_rank) if layout == "bshd"
                             else CPShard.thd(cu, cp, groups.cp_rank, group_of_seq=mb.group_of_seq))
                    smb = prepare_micro_batch(shard, local["mask"], torch.tensor(mb.group_of_seq),
                                              groups.cp, dtype=torch.float64)
                    old, ref = smb.view(local["old"]), smb.view(local["ref"])
                    got = sharded_advantages(name, smb, rewards=mb.rewards, kl=(old - ref) * smb.mask,
                                             values=old, **params)
                    expect = smb.view(local["logits"][..., 0])
                    err = torch.maximum(err, (got - expect).abs().max().reshape(1))
                dist.all_reduce(err, op=dist.ReduceOp.MAX)
                out[f"{case}|{layout}|cp{cp}"] = float(err)
    return out
