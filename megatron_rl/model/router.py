"""Group-limited routing with transformers' (DeepSeek-V3's) group score, in megatron-core's router.

DeepSeek-V3 scores a group of experts by the sum of its *two* best (bias-corrected) scores;
megatron-core's ``group_limited_topk`` sums the best ``topk // group_topk``, which agrees only
when that ratio is 2 (the released DeepSeek-V3: 8 // 4). Every model here is built from a Hugging
Face config, so megatron-core's router is pointed at transformers' rule; the rest of the routing
(which experts, their weights, the -inf mask of unselected groups) is megatron-core's own.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
_PATCHED = {}


def group_limited_topk_top2(scores: Tensor, topk: int, num_tokens: int, num_experts: int,
                            num_groups: int, group_topk: int):
    """``(scores [N, topk], indices [N, topk])``: the ``group_topk`` groups with the largest
    top-2 sums, then the ``topk`` best experts inside them (``scores``: ``[N, num_experts]``)."""
    per_group = num_experts // num_groups
    group_scores = scores.view(num_tokens, num_groups, per_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(num_tokens, num_groups, per_group).reshape(num_tokens, -1)
    return torch.topk(scores.masked_fill(~score_mask.bool(), float("-inf")), k=topk, dim=-1)


def use_transformers_group_score() -> None:
    """Point megatron-core's router at ``group_limited_topk_top2`` (idempotent; the router looks
    the function up in its module at every call)."""
    from megatron.core.transformer.moe import moe_utils

    if "group_limited_topk" not in _PATCHED:
        _PATCHED["group_limited_topk"] = moe_utils.group_limited_topk
        moe_utils.group_limited_topk = group_limited_topk_top2
