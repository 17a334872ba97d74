"""The forward-only passes (old-policy and reference log-probs, the critic's values) over larger
micro-batches than training's: ``train.logprob_max_tokens_per_micro_batch`` (verl's
``log_prob_max_token_len_per_gpu``). No autograd graph is kept, so a pass fits more tokens.

Legend: ``N`` tokens a training micro-batch holds on this rank (its CP shard), ``M`` those of a
merged one, ``[B, 2C]`` the per-sequence view (``parallel.loss``), ``L x K`` MoE layers x top-k.

A merged micro-batch is whole training micro-batches one after the other (packed, THD:
``batches.concat_micro_batches``); which ones is ``batch_plan.merged_passes``'s plan, the same
count on every DP rank. The results go back to the training micro-batches through the local
token stream: ``[B', 2C']`` -> ``[M]`` -> each part's ``[N]`` -> its ``[B, 2C]``. Expert routes
are laid out in the routers' order, whose sequence-parallel split gives TP rank ``t`` the
``t``-th contiguous ``1/tp`` of the stream: the split of the whole differs from its parts', so
routes cross TP in an all-gather (the only communication this adds).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from megatron_rl.parallel.collectives import all_gather_nograd
from megatron_rl.parallel.groups import ParallelGroups
from megatron_rl.train.batches import concat_micro_batches, router_order
from megatron_rl.train.megatron_loss import PolicyMicroBatch

Tensor = torch.Tensor
Pass = Callable[[List[PolicyMicroBatch]], List[Tensor]]


def merged_pass(run: Pass, micro_batches: Sequence[PolicyMicroBatch],
                bins: Sequence[Sequence[int]], pg: ParallelGroups, *,
                record_routes: bool = False, measure: bool = False) -> List[Tensor]:
    """``run`` (a forward-only pass returning ``[B, 2C]`` per micro-batch, or [] on a pipeline
    stage without a loss) over the micro-batches ``bins`` merges, with its per-token results
    cut back to ``micro_batches``. ``record_routes``: the pass recorded routes into the merged
    ``routes``, which go back to each part's ``routes``; ``measure``: its ``trainer_logprobs``
    go back likewise. Collective over TP when routes are involved (every TP rank runs the same
    bins)."""
    merged = [_merged(micro_batches, b, pg) for b in bins]
    out = run(merged)
    results: List[Optional[Tensor]] = [None] * len(micro_batches)
    for b, whole, got in zip(bins, merged, out if out else [None] * len(bins)):
        parts = [micro_batches[i] for i in b]
        if got is not None:
            for i, piece in zip(b, _split_view(got, whole, parts)):
                results[i] = piece
        if measure and whole.trainer_logprobs is not None:
            for p, piece in zip(parts, _split_view(whole.trainer_logprobs, whole, parts)):
                p.trainer_logprobs = piece
        if record_routes and whole.routes is not None:
            for p, piece in zip(parts, _split_routes(whole.routes, parts, pg)):
                p.routes = piece
    return results if out else []


def _merged(micro_batches: Sequence[PolicyMicroBatch], idx: Sequence[int],
            pg: ParallelGroups) -> PolicyMicroBatch:
    """The training micro-batches ``idx`` as one, with their routes in the whole's order."""
    parts = [micro_batches[i] for i in idx]
    engine = _joined_routes([p.engine_routes for p in parts], pg)
    # R3 replays the engine's routes (the same tensors): one exchange serves both
    same = all(p.routes is p.engine_routes for p in parts)
    routes = engine if same else _joined_routes([p.routes for p in parts], pg)
    return concat_micro_batches(parts, pg.cp, routes=routes, engine_routes=engine)


def _split_view(whole_view: Tensor, whole: PolicyMicroBatch,
                parts: Sequence[PolicyMicroBatch]) -> List[Tensor]:
    """A merged micro-batch's ``[B', 2C']`` per-token result as each part's ``[B, 2C]``."""
    local = whole.shard.shard.from_view(whole_view)                       # [M]
    pieces = local.split([int(p.tokens.shape[1]) for p in parts])         # [N] each
    return [p.shard.view(x) for p, x in zip(parts, pieces)]


def _joined_routes(routes: Sequence[Optional[Tensor]], pg: ParallelGroups) -> Optional[Tensor]:
    """The parts' routes (``[N / tp, L, K]`` each, in their routers' order) as the whole's
    ``[M / tp, L, K]``; None when the parts have none."""
    if all(r is None for r in routes):
        return None
    if any(r is None for r in routes):
        raise ValueError("some micro-batches carry expert routes and others do not: they cannot "
                         "share a forward")
    full = torch.cat([_local_stream(r, pg) for r in routes])
    return router_order(full, pg.tp_size, pg.tp_rank, packed=True)


def _split_routes(whole: Tensor, parts: Sequence[PolicyMicroBatch],
                  pg: ParallelGroups) -> List[Tensor]:
    """The merged micro-batch's recorded routes (``[M / tp, L, K]``) as each part's, in the
    part's routers' order."""
    full = _local_stream(whole, pg)                                        # [M, L, K]
    pieces = full.split([int(p.tokens.shape[1]) for p in parts])
    return [router_order(x, pg.tp_size, pg.tp_rank, packed=True) for x in pieces]


def _local_stream(routes: Tensor, pg: ParallelGroups) -> Tensor:
    """This CP rank's whole stream of routes ``[N, L, K]`` from this TP rank's ``[N / tp, L, K]``
    (the inverse of ``router_order`` for THD): an all-gather over TP."""
    return all_gather_nograd(routes, pg.tp, dim=0)
