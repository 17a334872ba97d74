"""The process groups the loss path needs, passed around explicitly as one small object.

Rank order is Megatron's: tensor-parallel fastest, then context-parallel, then data-parallel
(``rank = (d * cp + c) * tp + t``), so groups built here agree with ``parallel_state``'s. A group
of size 1 is ``None`` (see ``collectives``: no-op), so single-rank dimensions cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch.distributed as dist

from megatron_rl.parallel.collectives import Group, group_rank, group_size


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups a step uses (TP, CP, DP, PP, EP), passed explicitly to every collective."""
    tp: Group = None
    cp: Group = None
    dp: Group = None
    dp_cp: Group = None    # the partial-loss group: denominators and gradients sum over it

    @property
    def tp_size(self) -> int:
        """Tensor-parallel size (1 without a group)."""
        return group_size(self.tp)

    @property
    def tp_rank(self) -> int:
        """This rank's tensor-parallel index."""
        return group_rank(self.tp)

    @property
    def cp_size(self) -> int:
        """Context-parallel size (1 without a group)."""
        return group_size(self.cp)

    @property
    def cp_rank(self) -> int:
        """This rank's context-parallel index."""
        return group_rank(self.cp)

    @property
    def dp_size(self) -> int:
        """Data-parallel size (1 without a group)."""
        return group_size(self.dp)

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index."""
        return group_rank(self.dp)


def layout_ranks(tp: int, cp: int, dp: int) -> Dict[str, Tuple[Tuple[int, ...], ...]]:
    """The rank lists of every tp / cp / dp / dp_cp group of a ``tp x cp x dp`` layout."""
    def rank(t, c, d):
        """The global rank of TP index ``t``, CP index ``c``, DP index ``d``."""
        return (d * cp + c) * tp + t
    return {
        "tp": tuple(tuple(rank(t, c, d) for t in range(tp)) for d in range(dp) for c in range(cp)),
        "cp": tuple(tuple(rank(t, c, d) for c in range(cp)) for d in range(dp) for t in range(tp)),
        "dp": tuple(tuple(rank(t, c, d) for d in range(dp)) for c in range(cp) for t in range(tp)),
        "dp_cp": tuple(tuple(rank(t, c, d) for d in range(dp) for c in range(cp))
                       for t in range(tp)),
    }


def build_groups(tp: int, cp: int, dp: int, rank: Optional[int] = None) -> Optional[ParallelGroups]:
    """Create the groups of a ``tp x cp x dp`` layout over world ranks ``0 .. tp*cp*dp-1``.

    Every rank of the world must call this with the same sizes (``new_group`` is collective);
    ranks outside the layout get ``None``. For runs without Megatron (tests, benchmarks); the
    trainer takes Megatron's own groups.
    """
    rank = dist.get_rank() if rank is None else rank
    mine = {}
    for kind, lists in layout_ranks(tp, cp, dp).items():
        for ranks in lists:
            g = dist.new_group(list(ranks)) if len(ranks) > 1 else None
            if rank in ranks:
                mine[kind] = g
    return ParallelGroups(**mine) if rank < tp * cp * dp else None




@dataclass(frozen=True)
class ShardGroups:
    """Where this rank's weights sit, for the HF weight mapping (``checkpoint.hf_weights``;
    ``runtime.parallel_init.weight_groups`` builds it)."""

    tp: Group = None        # dense tensors' TP group
    etp: Group = None       # routed experts' TP group
    ep_rank: int = 0
    ep_size: int = 1
