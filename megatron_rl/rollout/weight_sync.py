"""The trainer's weights into the running vLLM engine, bucket by bucket, and a check that they took.

``sync_weights`` streams ``checkpoint.hf_weights.iter_hf_weights`` (every rank gets every HF
tensor; TP / PP / EP shards gathered tensor by tensor) in buckets of ``bucket_bytes`` into vLLM's
in-place ``reload_weights``, which consumes the stream lazily: the extra memory is one bucket,
never the whole model. vLLM's CPU MoE kernel keeps a packed copy of the expert weights that an
in-place reload does not refresh (log-probs then drift by 0.03-0.05), so the experts are re-packed
after a reload. ``probe_mismatch`` measures what users call the train/inference mismatch: the max
|log-prob| difference between the engine and the trainer's forward on fixed probe tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, List, Sequence, Tuple

import torch

from megatron_rl.checkpoint.hf_weights import iter_hf_buckets

Tensor = torch.Tensor


@dataclass
class SyncStats:
    """What a weight sync moved: seconds, tensors, bytes, buckets and the largest one, MoE layers
    repacked."""
    seconds: float
    tensors: int
    bytes: int
    buckets: int
    max_bucket_bytes: int
    repacked_moe_layers: int


def _stream(weights: Iterator[Tuple[str, Tensor]], bucket_bytes: int, stats: SyncStats):
    for bucket in iter_hf_buckets(weights, bucket_bytes):
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        stats.buckets += 1
        stats.tensors += len(bucket)
        stats.bytes += size
        stats.max_bucket_bytes = max(stats.max_bucket_bytes, size)
        yield from bucket


def _repack_cpu_experts(worker) -> int:
    """vLLM 0.32 CPU: re-run the fused-MoE kernel's weight packing after an in-place reload."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    n = 0
    for module in worker.model_runner.model.modules():
        if isinstance(module, RoutedExperts):
            module.quant_method.moe_kernel.fused_experts.process_weights_after_loading(module)
            n += 1
    return n


def sync_weights(engine, weights: Iterator[Tuple[str, Tensor]], bucket_bytes: int) -> SyncStats:
    """Load ``weights`` (``(hf_name, tensor)``, every tensor of the model) into ``engine``
    (a ``rollout.engine.RolloutEngine``) in place. Collective when ``weights`` is."""
    stats = SyncStats(0.0, 0, 0, 0, 0, 0)
    t0 = time.perf_counter()
    llm = engine.llm
    llm.collective_rpc("reload_weights",
                       kwargs={"weights_iterator": _stream(weights, bucket_bytes, stats)})
    if not torch.cuda.is_available():
        stats.repacked_moe_layers = sum(llm.collective_rpc(_repack_cpu_experts))
    llm.reset_prefix_cache()
    stats.seconds = time.perf_counter() - t0
    return stats


def probe_mismatch(engine_logprobs: Sequence[float], trainer_logprobs: Tensor) -> float:
    """Max |engine - trainer| log-prob over the probe's generated tokens."""
    return float((torch.tensor(list(engine_logprobs)) - trainer_logprobs.float().cpu()).abs().max())


def sequence_logprobs(logits: Tensor, token_ids: List[int], prompt_len: int) -> Tensor:
    """Log-probs of ``token_ids[prompt_len:]`` from full-sequence logits ``[T, V]`` (whole vocab)."""
    lp = torch.log_softmax(logits.float(), -1)
    targets = torch.tensor(token_ids[prompt_len:], device=logits.device)
    return lp[prompt_len - 1:len(token_ids) - 1].gather(1, targets[:, None])[:, 0]
