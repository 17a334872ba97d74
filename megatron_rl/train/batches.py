"""Assemble this rank's micro-batches from per-sequence data: padded (BSHD) or packed (THD), each
sequence padded to a multiple of ``2*cp`` and sharded with Megatron's CP layout.

A sequence is a dict of 1-D tensors of its length ``n``: ``tokens`` (prompt + response),
``loss_mask`` (1 on the response's action tokens, over token positions), and per-token loss
inputs in *label* coordinates (row ``p`` is about token ``p+1``: ``old_logprobs``,
``advantages``, optionally ``ref_logprobs``, ``rollout_logprobs``), and optionally the engine's
expert ``routes`` (int16 ``[n, L, K]`` in *token* coordinates, -1 rows where unknown), which are
cut exactly like the tokens and then laid out in the routers' order (``router_order``).
Which groups form a micro-batch under a token budget is ``train.batch_plan``'s.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from megatron_rl.parallel.collectives import Group
from megatron_rl.parallel.cp_layout import (CPShard, bshd_shard, padded_length, shift_left,
                                            thd_shard)
from megatron_rl.parallel.loss import prepare_micro_batch
from megatron_rl.train.megatron_loss import PolicyMicroBatch

Tensor = torch.Tensor
LOSS_INPUTS = ("old_logprobs", "advantages", "ref_logprobs", "rollout_logprobs")


def _pad(x: Tensor, n: int) -> Tensor:
    return torch.cat([x, x.new_zeros(n - x.shape[0])])


def _stack_padded(xs: Sequence[Tensor], n: int) -> Tensor:
    """``[len(xs), n]``: each 1-D tensor zero-padded on the right, in one scatter (not a pad and
    a copy per row: a step has hundreds of sequences)."""
    lens = torch.tensor([int(x.shape[0]) for x in xs])
    out = xs[0].new_zeros(len(xs), n)
    out[torch.repeat_interleave(torch.arange(len(xs)), lens), _ranges(lens)] = torch.cat(list(xs))
    return out


def _ranges(lens: Tensor) -> Tensor:
    """``cat([arange(n) for n in lens])`` without a Python loop."""
    starts = torch.cumsum(lens, 0) - lens
    return torch.arange(int(lens.sum())) - torch.repeat_interleave(starts, lens)


def _routes_padded(xs: Sequence[Tensor], n: int) -> Tensor:
    """``[len(xs), n, L, K]``: each sequence's routes, padding rows -1 (routed live)."""
    out = xs[0].new_full((len(xs), n, *xs[0].shape[1:]), -1)
    for i, x in enumerate(xs):
        out[i, :x.shape[0]] = x
    return out


def router_order(local: Tensor, tp_size: int, tp_rank: int, packed: bool) -> Tensor:
    """This rank's CP shard of the routes (BSHD ``[B, s, L, K]``, THD ``[N, L, K]``) in the order
    its MoE routers see tokens: the embedding makes BSHD position-major (``[s, B]``), sequence
    parallelism gives TP rank ``t`` the ``t``-th contiguous ``1/tp`` of positions, and the router
    flattens ``[s, B]`` row-major. Returns ``[N / tp, L, K]``."""
    x = local if packed else local.transpose(0, 1)
    x = x.reshape(tp_size, x.shape[0] // tp_size, *x.shape[1:])[tp_rank]
    return x.reshape(-1, *x.shape[-2:])


def _routes_of(seqs, padded_lens, packed: bool, cu, S, cp_size: int, cp_rank: int, tp_size: int,
               tp_rank: int, layers: Sequence[int]) -> Tensor:
    """The micro-batch's routes for this rank's routers: ``[N, len(layers), K]`` int16, on the
    host (each router moves its own column to the device in the forward that uses it)."""
    if packed:
        full = torch.cat([_routes_padded([s["routes"]], p)[0] for s, p in zip(seqs, padded_lens)])
        local = thd_shard(full, cu, cp_size, cp_rank)
    else:
        local = bshd_shard(_routes_padded([s["routes"] for s in seqs], S), cp_size, cp_rank)
    ordered = router_order(local, tp_size, tp_rank, packed)
    return ordered.index_select(1, torch.tensor(list(layers), dtype=torch.long))


def packed_lengths(lens: Sequence[int], group_of_seq: Sequence[int], cp_size: int,
                   align_groups: bool, tp_size: int = 1) -> List[int]:
    """Each sequence's padded length in a packed (THD) micro-batch: a multiple of ``2*cp``; with
    ``align_groups`` the longest of its group's, so that position ``p`` of every member of a group
    sits in the same view column on the same CP rank and per-position group statistics stay local
    (``CPShard.positions_aligned``) instead of all-reducing a ``[groups, S_max]`` buffer."""
    if not align_groups or cp_size == 1:
        return [padded_length(n, cp_size, tp_size) for n in lens]
    longest: Dict[int, int] = {}
    for g, n in zip(group_of_seq, lens):
        longest[g] = max(longest.get(g, 0), n)
    return [padded_length(longest[g], cp_size, tp_size) for g in group_of_seq]


def build_micro_batch(seqs: Sequence[Dict[str, Tensor]], group_ids: Tensor, *, packed: bool,
                      cp_size: int = 1, cp_rank: int = 0, cp_group: Group = None,
                      num_groups: Optional[int] = None, align_groups: bool = False,
                      tp_size: int = 1, tp_rank: int = 0, route_layers: Optional[Sequence[int]] = None,
                      device=None) -> PolicyMicroBatch:
    """This CP rank's ``PolicyMicroBatch`` of ``seqs`` (THD when ``packed``, else BSHD), on
    ``device`` (default: where the sequences are). The layout is computed from host lengths and
    the host group ids; the only device work is one copy per field and the sequence-length
    all-reduce over CP. ``align_groups``: see ``packed_lengths`` (BSHD is always aligned).
    Every sequence is padded to a multiple of ``2 * cp_size * tp_size`` (``padded_length``).
    ``route_layers``: this stage's MoE layers (``RouteControl.layers``); with it, sequences'
    ``routes`` become ``engine_routes`` in the order of this (CP, TP) rank's routers."""
    lens = [int(s["tokens"].shape[0]) for s in seqs]
    group_of_seq = [int(g) for g in group_ids]
    device = seqs[0]["tokens"].device if device is None else torch.device(device)
    present = [k for k in LOSS_INPUTS if seqs[0].get(k) is not None]
    aligned = actions_share_columns([s["loss_mask"] for s in seqs], group_of_seq)
    if packed:
        padded = packed_lengths(lens, group_of_seq, cp_size, align_groups, tp_size)
        cu = [0] + torch.tensor(padded).cumsum(0).tolist()
        full = {k: torch.cat([_pad(s[k], p) for s, p in zip(seqs, padded)])
                for k in ("tokens", "loss_mask", *present)}
        full["labels"], full["mask"] = (shift_left(full[k], 0, cu) for k in ("tokens", "loss_mask"))
        full["positions"] = torch.cat([torch.arange(p) for p in padded])
        local = {k: thd_shard(v, cu, cp_size, cp_rank).to(device) for k, v in full.items()}
        shard = CPShard.thd(cu, cp_size, cp_rank, device=device, group_of_seq=group_of_seq,
                            actions_aligned=aligned)
        psp = _packed_seq_params(cu, max(padded), device)
        model_in = {k: local[k][None] for k in ("tokens", "positions", "labels")}  # [1, N]
        S = None
    else:
        S = padded_length(max(lens), cp_size, tp_size)
        full = {k: _stack_padded([s[k] for s in seqs], S) for k in ("tokens", "loss_mask", *present)}
        full["labels"], full["mask"] = (shift_left(full[k], 1) for k in ("tokens", "loss_mask"))
        full["positions"] = torch.arange(S).expand(len(seqs), S)
        local = {k: bshd_shard(v, cp_size, cp_rank).to(device) for k, v in full.items()}
        shard, psp = CPShard.bshd(len(seqs), S, cp_size, cp_rank, device=device,
                                 actions_aligned=aligned), None
        model_in = {k: local[k] for k in ("tokens", "positions", "labels")}
        padded, cu = None, None
    routes = None
    if route_layers is not None and seqs[0].get("routes") is not None:
        routes = _routes_of(seqs, padded, packed, cu, S, cp_size, cp_rank, tp_size, tp_rank,
                            route_layers)
    smb = prepare_micro_batch(shard, local["mask"], group_ids.to(device), cp_group,
                              num_groups=num_groups)
    return PolicyMicroBatch(tokens=model_in["tokens"], position_ids=model_in["positions"],
                            labels=model_in["labels"], shard=smb, packed_seq_params=psp,
                            engine_routes=routes, **{k: smb.view(local[k]) for k in present})


def concat_micro_batches(parts: Sequence[PolicyMicroBatch], cp_group: Group,
                         routes: Optional[Tensor] = None,
                         engine_routes: Optional[Tensor] = None) -> PolicyMicroBatch:
    """One packed (THD) micro-batch of ``parts`` (packed micro-batches of this CP rank), for a
    forward-only pass: the model inputs and the ``[B, 2C]`` layout, no loss inputs. A sequence's
    CP shard depends on its own padded length only, so this rank's stream of the whole is its
    parts' streams one after the other, and the result equals ``build_micro_batch`` on their
    sequences. ``routes`` / ``engine_routes``: the whole's, in its routers' order (the caller
    re-orders them over TP: ``train.logprob_batches``)."""
    if any(p.packed_seq_params is None for p in parts):
        raise ValueError("only packed (THD) micro-batches can be concatenated: a padded (BSHD) "
                         "sequence's CP shard depends on its micro-batch's longest sequence")
    cu, groups, offset = [0], [], 0
    for p in parts:
        own = p.packed_seq_params.host_cu_seqlens
        cu += [cu[-1] + c for c in own[1:]]
        groups.append(p.shard.group_ids + offset)
        offset += p.shard.ops.num_groups
    first = parts[0].shard.shard
    device = parts[0].tokens.device
    shard = CPShard.thd(cu, first.cp_size, first.cp_rank, device=device)
    mask = torch.cat([p.shard.shard.from_view(p.shard.mask) for p in parts])
    smb = prepare_micro_batch(shard, mask, torch.cat(groups), cp_group, num_groups=offset)
    lens = [e - s for s, e in zip(cu[:-1], cu[1:])]
    cat = lambda k: torch.cat([getattr(p, k) for p in parts], dim=1)  # noqa: E731
    return PolicyMicroBatch(tokens=cat("tokens"), position_ids=cat("position_ids"),
                            labels=cat("labels"), shard=smb, old_logprobs=None, advantages=None,
                            packed_seq_params=_packed_seq_params(cu, max(lens), device),
                            routes=routes, engine_routes=engine_routes)


def actions_share_columns(loss_masks: Sequence[Tensor], group_of_seq: Sequence[int]) -> bool:
    """True when each sequence's actions are one contiguous run and the members of a group start
    it at the same token position (single-turn responses to one prompt): then the ``j``-th action
    of every member sits in the same column and per-action statistics can pool by column.
    Multi-turn sequences (environment tokens between actions) make this False. Host masks."""
    on = _stack_padded([m.detach().cpu() > 0 for m in loss_masks],
                       max(int(m.shape[0]) for m in loss_masks))          # [B, S_max] bool
    count = on.sum(1)
    first = on.to(torch.uint8).argmax(1)
    last = on.shape[1] - 1 - on.flip(1).to(torch.uint8).argmax(1)
    has = count > 0
    if bool((last - first + 1 != count)[has].any()):
        return False
    start: Dict[int, int] = {}
    for g, f in zip(torch.tensor(list(group_of_seq))[has].tolist(), first[has].tolist()):
        if start.setdefault(g, f) != f:
            return False
    return True


def _packed_seq_params(cu: List[int], max_len: int, device=None):
    from megatron.core.packed_seq_params import PackedSeqParams

    t = torch.tensor(cu, dtype=torch.int32, device=device)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=t, cu_seqlens_kv=t,
                          cu_seqlens_q_padded=t, cu_seqlens_kv_padded=t,
                          max_seqlen_q=max_len, max_seqlen_kv=max_len)
    # the host copy: our attention cuts the stream per sequence on the host, and reading the
    # device tensor back in every layer would be a device sync per layer
    psp.host_cu_seqlens = tuple(cu)
    return psp
