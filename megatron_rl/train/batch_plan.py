"""Token-budget micro-batches: which groups each data-parallel rank trains on, and how its groups
are cut into micro-batches, from host lengths alone.

Every rank holds every sequence's length (the step's samples reach every rank), so every rank
computes the same plan with no communication. Legend: ``P`` groups of the step, ``D`` DP ranks,
``M`` micro-batches per rank (equal on every rank: Megatron's schedule, the expert all-to-alls of
EP and pipeline parallelism need every rank to run the same number).

* **DP balance**: each rank keeps the same number of whole groups (``P / D``, as the fixed-count
  path), chosen so their token counts balance: Karmarkar-Karp's largest differencing method over
  ``D``-way partitions with equal cardinality (verl's ``get_seqlen_balanced_partitions`` solves the
  same problem), ties broken by group index, so the plan is deterministic.
* **Micro-batches**: each rank packs its groups first-fit decreasing under the budget (the cost
  of a micro-batch is what ``build_micro_batch`` will lay out: THD the sum of padded lengths, BSHD
  sequences x the longest), then splits its fullest micro-batches until it has ``M``, the largest
  count any rank needs. A group costlier than the budget alone is a micro-batch of its own
  (``over_budget`` counts them).

The loss does not depend on the cut: every normaliser is the update's global token and sequence
count (``parallel.loss.step_denominators``), and micro-batches hold whole groups.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

from megatron_rl.parallel.cp_layout import padded_length
from megatron_rl.train.batches import packed_lengths

Cost = Callable[[Sequence[int]], int]     # group indices -> tokens of their micro-batch


@dataclass(frozen=True)
class BatchPlan:
    """The step's plan: ``ranks[d]`` is DP rank ``d``'s micro-batches, each a list of group
    indices; the layout's token counts for the metrics."""

    ranks: List[List[List[int]]]
    tokens: List[int]            # real tokens per rank
    laid_out: List[int]          # tokens per rank as laid out (padding included)
    over_budget: int             # groups costlier than the budget alone

    @staticmethod
    def concat(plans: Sequence["BatchPlan"]) -> "BatchPlan":
        """One plan running ``plans`` one after the other (one per update)."""
        ranks = [[mb for p in plans for mb in p.ranks[d]] for d in range(len(plans[0].ranks))]
        return BatchPlan(ranks, [sum(t) for t in zip(*(p.tokens for p in plans))],
                         [sum(t) for t in zip(*(p.laid_out for p in plans))],
                         sum(p.over_budget for p in plans))

    def metrics(self) -> Dict[str, float]:
        """``batch/pad_frac`` (padding / laid-out tokens over every rank), ``batch/micro_batches``
        (per rank), ``batch/dp_token_imbalance`` (the busiest rank's real tokens over the mean,
        minus 1) and ``batch/over_budget_groups``."""
        total = sum(self.laid_out)
        mean = sum(self.tokens) / len(self.tokens)
        return {"batch/pad_frac": 1.0 - sum(self.tokens) / total if total else 0.0,
                "batch/micro_batches": float(len(self.ranks[0])),
                "batch/dp_token_imbalance": max(self.tokens) / mean - 1.0 if mean else 0.0,
                "batch/over_budget_groups": float(self.over_budget)}


def balanced_partition(weights: Sequence[int], parts: int) -> List[List[int]]:
    """Indices of ``weights`` in ``parts`` sets of equal size (``len(weights)`` must divide),
    sums balanced by the largest differencing method: the items, sorted by weight, are dealt
    in rounds of ``parts`` (one per set), and the two partial partitions with the largest spread
    are merged heaviest set with lightest, until one is left."""
    n = len(weights)
    if n % parts:
        raise ValueError(f"{n} items do not split into {parts} equal parts")
    order = sorted(range(n), key=lambda i: (weights[i], i))
    heap = []    # (-spread, tiebreak, sets sorted by sum: [(sum, [indices])])
    for r in range(0, n, parts):
        sets = sorted(((weights[i], [i]) for i in order[r:r + parts]), key=lambda s: s[0])
        heapq.heappush(heap, (-(sets[-1][0] - sets[0][0]), r, sets))
    while len(heap) > 1:
        _, t1, a = heapq.heappop(heap)
        _, t2, b = heapq.heappop(heap)
        merged = sorted(((sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b))),
                        key=lambda s: s[0])
        heapq.heappush(heap, (-(merged[-1][0] - merged[0][0]), min(t1, t2), merged))
    return [sorted(ix) for _, ix in heap[0][2]]


def pack_groups(groups: Sequence[int], weights: Sequence[int], cost: Cost,
                budget: int) -> List[List[int]]:
    """First-fit decreasing of ``groups`` (indices; ``weights`` by index orders them) into
    micro-batches whose ``cost`` stays within ``budget``; a group over it alone gets its own."""
    bins: List[List[int]] = []
    for g in sorted(groups, key=lambda g: (-weights[g], g)):
        for b in bins:
            if cost(b + [g]) <= budget:
                b.append(g)
                break
        else:
            bins.append([g])
    return bins


def split_to(bins: List[List[int]], count: int, cost: Cost) -> List[List[int]]:
    """``bins`` split until there are ``count``: the costliest bin of two or more groups is cut
    in two by alternating its groups in cost order (needs at least ``count`` groups)."""
    bins = [list(b) for b in bins]
    while len(bins) < count:
        splittable = [b for b in bins if len(b) > 1]
        b = max(splittable, key=lambda b: (cost(b), -min(b)))
        bins.remove(b)
        ranked = sorted(b, key=lambda g: (-cost([g]), g))
        bins += [ranked[0::2], ranked[1::2]]
    return bins


def micro_batch_cost(lengths: Sequence[Sequence[int]], *, packed: bool, cp_size: int,
                     align_groups: bool, tp_size: int = 1) -> Cost:
    """The laid-out token count of a micro-batch of groups (``lengths[g]``: the sequence lengths
    of group ``g``), exactly as ``batches.build_micro_batch`` pads them."""
    def cost(groups: Sequence[int]) -> int:
        """Laid-out tokens of a micro-batch of ``groups``."""
        lens = [n for g in groups for n in lengths[g]]
        if packed:
            gid = [j for j, g in enumerate(groups) for _ in lengths[g]]
            return sum(packed_lengths(lens, gid, cp_size, align_groups, tp_size))
        return len(lens) * padded_length(max(lens), cp_size, tp_size)
    return cost


def plan_step(groups: Sequence[int], weights: Sequence[int], dp: int, budget: int,
              cost: Cost) -> BatchPlan:
    """The plan of ``groups`` (indices, ``len % dp == 0``; ``weights[g]``: group ``g``'s real
    tokens): each DP rank's share balanced by tokens, packed under ``budget`` into the same number
    of micro-batches on every rank, ordered by their first group (deterministic)."""
    shares = [[groups[i] for i in part]
              for part in balanced_partition([weights[g] for g in groups], dp)]
    packed = [pack_groups(s, weights, cost, budget) for s in shares]
    count = max(len(p) for p in packed)
    ranks = [sorted((sorted(b) for b in split_to(p, count, cost)), key=lambda b: b[0])
             for p in packed]
    over = sum(1 for g in groups if cost([g]) > budget)
    return BatchPlan(ranks, [sum(weights[g] for g in s) for s in shares],
                     [sum(cost(b) for b in r) for r in ranks], over)


def fixed_plan(lengths: Sequence[Sequence[int]], dp: int, groups_per_micro_batch: int,
               cost: Cost) -> BatchPlan:
    """The fixed-count path as a plan (for its metrics): rank ``d`` takes the ``d``-th contiguous
    share of the groups, cut into runs of ``groups_per_micro_batch``."""
    per_rank = len(lengths) // dp
    ranks = []
    for d in range(dp):
        share = list(range(d * per_rank, (d + 1) * per_rank))
        ranks.append([share[i:i + groups_per_micro_batch]
                      for i in range(0, per_rank, groups_per_micro_batch)])
    tokens = [sum(n for b in r for g in b for n in lengths[g]) for r in ranks]
    return BatchPlan(ranks, tokens, [sum(cost(b) for b in r) for r in ranks], 0)


def merged_passes(costs: Sequence[Sequence[int]], budget: int) -> List[List[List[int]]]:
    """The no-grad passes' micro-batches (``train.logprob_max_tokens_per_micro_batch``): each DP
    rank's training micro-batches (``costs[d][m]``: laid-out tokens of its ``m``-th) merged,
    first-fit decreasing, into as few as fit ``budget``, then split back until every rank has
    the same count (their passes run Megatron's schedule and EP's all-to-alls together). Returns
    ``[d][pass] -> training micro-batch indices``, sorted. Merging never cuts a training
    micro-batch, so the laid-out token count of a merged one is the sum of its parts'."""
    packed = []
    for rank_costs in costs:
        total = lambda ms, c=rank_costs: sum(c[m] for m in ms)  # noqa: E731
        packed.append((pack_groups(range(len(rank_costs)), rank_costs, total, budget), total))
    count = max(len(p) for p, _ in packed)
    return [sorted((sorted(b) for b in split_to(p, count, total)), key=lambda b: b[0])
            for p, total in packed]
