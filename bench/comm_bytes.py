"""Bytes each CP rank communicates per step: our GSPO + future-KL path vs gathering whole sequences.

    python bench/comm_bytes.py                 # responses of 1k, 8k, 32k tokens; 64 sequences; CP 2 and 4
    python bench/comm_bytes.py --lengths 2048 --cp 2

Ours runs the real code (``parallel.loss``) in gloo processes on random data, forward and
backward, for two paths: ``gspo`` (GRPO advantage, GSPO loss) and ``future_kl+gspo`` (the
future_kl_grpo advantage -- suffix sums and per-position group statistics -- with the GSPO
sequence ratio in the loss); both include the sequence lengths and the step denominators. Every
``torch.distributed`` collective it issues is counted. The baseline is what verl / slime /
NeMo-RL / ROLL do under CP: all-gather the per-token log-probs (current, old, reference) so every
rank holds whole sequences, then compute the same quantities locally -- measured by issuing those
all-gathers in the same processes (forward only: the backward would add a reduce-scatter) over
the tokens a rank holds without padding. Bytes use the ring model: all-reduce of n bytes moves
2(p-1)/p*n per rank, all-gather of an n-byte result (p-1)/p*n. 64 sequences = 8 prompts x 8
responses, prompts of 128 tokens, response lengths uniform in [L/2, L].

Layouts: ``bshd`` pads every sequence to the longest; ``thd`` packs as the trainer does
(``train.batches.packed_lengths``: group-aligned lengths for estimators with per-position
statistics, i.e. future-KL, each sequence's own length otherwise); ``thd_ragged`` packs each
sequence at its own length whatever the estimator (a user's own packing: the per-position
statistics then all-reduce a ``[groups, S_max]`` buffer).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_rl.parallel.launch import free_port

COUNT = {"bytes": 0.0, "calls": 0}


def _counted(fn, factor):
    def wrapper(tensor, *args, **kwargs):
        p = dist.get_world_size(kwargs.get("group"))
        COUNT["bytes"] += factor(p) * tensor.numel() * tensor.element_size()
        COUNT["calls"] += 1
        return fn(tensor, *args, **kwargs)
    return wrapper


def _install_counters():
    dist.all_reduce = _counted(dist.all_reduce, lambda p: 2 * (p - 1) / p)
    gather = dist.all_gather

    def all_gather(outputs, tensor, *args, **kwargs):  # result = p x the input
        p = dist.get_world_size(kwargs.get("group"))
        COUNT["bytes"] += (p - 1) * tensor.numel() * tensor.element_size()
        COUNT["calls"] += 1
        return gather(outputs, tensor, *args, **kwargs)

    dist.all_gather = all_gather


def _batch(L, cp, layout, rank, g, per_position):
    from megatron_rl.parallel.cp_layout import CPShard, padded_length
    from megatron_rl.train.batches import packed_lengths

    B, G, prompt = 64, 8, 128
    resp = torch.randint(L // 2, L + 1, (B,), generator=g).tolist()
    group_of_seq = [b // G for b in range(B)]
    n = [prompt + r for r in resp]
    if layout == "bshd":
        S = padded_length(max(n), cp)
        shard = CPShard.bshd(B, S, cp, rank, actions_aligned=True)   # single-turn
    else:
        align = per_position and layout == "thd"
        cu = [0] + torch.tensor(packed_lengths(n, group_of_seq, cp, align)).cumsum(0).tolist()
        shard = CPShard.thd(cu, cp, rank, group_of_seq=group_of_seq, actions_aligned=True)
    pos, valid = shard.positions, shard.valid
    resp_t = torch.tensor(resp)[:, None]
    mask = (valid & (pos >= prompt - 1) & (pos < prompt - 1 + resp_t)).float()
    return shard, mask, torch.tensor(group_of_seq), G, sum(n) // cp


def _ours(L, cp, layout, rank, group, path):
    from megatron_rl.parallel.loss import (prepare_micro_batch, sharded_advantages,
                                           sharded_policy_loss, step_denominators)

    g = torch.Generator().manual_seed(0)
    shard, mask, gid, G, unpadded = _batch(L, cp, layout, rank, g, path != "gspo")
    mb = prepare_micro_batch(shard, shard.from_view(mask), gid, group, num_groups=64 // G)
    num_tokens, num_seqs = step_denominators([mb], group)
    lp = (-torch.rand(mask.shape, generator=g)).requires_grad_()
    old, ref = lp.detach() + 0.01, lp.detach() - 0.1
    rewards = torch.rand(64, generator=g)
    if path == "gspo":
        adv = sharded_advantages("grpo", mb, rewards=rewards)
        loss, _ = sharded_policy_loss("gspo", mb, logprobs=lp, old_logprobs=old, advantages=adv,
                                      num_tokens=num_tokens, num_seqs=num_seqs)
    else:
        adv = sharded_advantages("future_kl_grpo", mb, rewards=rewards, kl=(old - ref) * mb.mask,
                                 beta=0.1)
        loss, _ = sharded_policy_loss("future_kl_grpo", mb, logprobs=lp, old_logprobs=old,
                                      advantages=adv, num_tokens=num_tokens, num_seqs=num_seqs,
                                      ratio="sequence", agg="seq-mean-token-mean")
    loss.backward()
    return unpadded  # tokens this rank holds, padding left out


def _gather_baseline(local_tokens, cp, group):
    for _ in ("logprobs", "old_logprobs", "ref_logprobs"):
        x = torch.zeros(local_tokens)
        dist.all_gather([torch.empty_like(x) for _ in range(cp)], x, group=group)


def _worker(rank, world, port, lengths, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    _install_counters()
    group = dist.group.WORLD
    rows = []
    for L in lengths:
        for path in ("gspo", "future_kl+gspo"):
            for layout in ("bshd", "thd", "thd_ragged"):
                COUNT.update(bytes=0.0, calls=0)
                local = _ours(L, world, layout, rank, group, path)
                ours = dict(COUNT)
                COUNT.update(bytes=0.0, calls=0)
                _gather_baseline(local, world, group)  # the tokens this rank holds, x3 tensors
                rows.append((L, world, path, layout, ours["bytes"], ours["calls"], COUNT["bytes"],
                             COUNT["calls"]))
    if rank == 0:
        out.extend(rows)
    dist.destroy_process_group()




def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--cp", type=int, nargs="+", default=[2, 4])
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"{'resp len':>8s} {'CP':>2s} {'path':14s} {'layout':11s} {'ours B/rank':>12s} {'calls':>5s} "
          f"{'all-gather B/rank':>17s} {'calls':>5s} {'ratio':>8s}")
    with mp.Manager() as m:
        for cp in a.cp:
            out = m.list()
            mp.spawn(_worker, args=(cp, free_port(), a.lengths, out), nprocs=cp, join=True)
            for L, cp_, path, layout, ob, oc, gb, gc in out:
                print(f"{L:8d} {cp_:2d} {path:14s} {layout:11s} {ob:12,.0f} {oc:5d} {gb:17,.0f} {gc:5d} "
                      f"{gb / ob:8.1f}")


if __name__ == "__main__":
    main()
