"""Importance-sampling log-ratios ``[B,T]`` from per-token log-ratios ``d_k = lp_k - lp_old_k``.

  token     log rho_j = d_j
  sequence  log s     = (1/H) sum_k d_k             (GSPO: geometric mean over the response)
  future    log rho_j = mean_{k >= j} d_k           (future-only geometric mean)
Returned on action tokens, 0 elsewhere; gradients flow through ``logprobs`` as the definitions
say (the REINFORCE-form losses only use the values).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_rl.algo.masked import LOCAL, SeqOps, as_float_mask
from megatron_rl.algo.registry import Registry

Tensor = torch.Tensor

RATIO_KINDS = Registry("ratio kind")


@RATIO_KINDS.register("token")
def _token(d: Tensor, mask: Tensor, lengths: Optional[Tensor], ops: SeqOps) -> Tensor:
    return d


@RATIO_KINDS.register("sequence")
def _sequence(d: Tensor, mask: Tensor, lengths: Optional[Tensor], ops: SeqOps) -> Tensor:
    if lengths is None:
        lengths = ops.seq_len(mask, d.dtype)
    return (ops.seq_sum(d, mask) / lengths.to(d.dtype).clamp_min(1))[:, None].expand_as(d)


@RATIO_KINDS.register("future")
def _future(d: Tensor, mask: Tensor, lengths: Optional[Tensor], ops: SeqOps) -> Tensor:
    remaining = ops.suffix_sum(torch.ones_like(d), mask)
    return ops.suffix_sum(d, mask) / remaining.clamp_min(1)


def log_ratio(
    kind: str, logprobs: Tensor, old_logprobs: Tensor, mask: Tensor,
    lengths: Optional[Tensor] = None, ops: SeqOps = LOCAL,
) -> Tensor:
    """Log IS ratio of ``kind`` in {token, sequence, future}, ``[B,T]``, 0 off the mask.

    ``lengths[B]``, if given, is the per-sequence action count ``sequence`` divides by (pass the
    one computed for the micro-batch rather than have ``ops`` reduce it again); ``ops`` runs the
    sums along sequences (sharded sequences: ``CPSeqOps``).
    """
    fn = RATIO_KINDS.get_fn(kind)
    m = as_float_mask(mask, logprobs)
    d = (logprobs - old_logprobs) * m
    return fn(d, mask, lengths, ops) * m
