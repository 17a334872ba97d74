"""The root ``RunConfig``: the sections owned by their modules, and the rules that span sections."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_rl.algo.config import GROUP_ESTIMATORS, AlgoConfig
from megatron_rl.config.soundness import check_batching, check_placement, check_sampling
from megatron_rl.fields import ConfigError, check_fields
from megatron_rl.data.config import DataConfig
from megatron_rl.envs.config import EnvConfig
from megatron_rl.model.config import ModelConfig
from megatron_rl.parallel.config import ParallelConfig
from megatron_rl.rewards.config import RewardConfig
from megatron_rl.rollout.config import RolloutConfig
from megatron_rl.config.train import CriticConfig, TrainConfig


@dataclass
class RunConfig:
    """The whole run: one dataclass per section, each owned by its module."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)


def validate(cfg: RunConfig) -> None:
    """Field constraints of every section, then the rules that involve more than one."""
    check_fields(cfg, "")
    cfg.algo.check("algo", context_parallel=cfg.parallel.context_parallel_size)
    cfg.reward.check("reward")
    cfg.env.check("env")
    if cfg.env.name:
        _check_env(cfg)
        for used, what in ((cfg.reward.uses_service(), "a reward service (http)"),
                           (cfg.reward.uses_model(), "the learned reward model (model)")):
            if used:
                raise ConfigError(f"reward.name: {what} does not score multi-turn episodes yet "
                                  f"(env.name={cfg.env.name} scores each episode with a rule or "
                                  "user reward); use one of those, or env.name=''")
    if cfg.reward.uses_model() and cfg.rollout.placement == "separate":
        raise ConfigError("reward.name: the learned reward model scores on the trainer ranks "
                          "inside the colocated rollout; with rollout.placement=separate use a "
                          "reward service (reward.name: http) or rollout.placement=colocated")
    if not cfg.data.path:
        raise ConfigError("data.path: required (a .jsonl or .parquet file with prompt and label "
                          "columns, or synthetic:<task>)")
    _check_model(cfg)
    check_sampling(cfg)
    check_batching(cfg)
    check_placement(cfg)
    if cfg.algo.advantage.name == "gae":
        _check_critic(cfg)
    if cfg.algo.advantage.name in GROUP_ESTIMATORS and cfg.rollout.n_samples_per_prompt < 2:
        raise ConfigError(
            f"rollout.n_samples_per_prompt: algo.advantage.name={cfg.algo.advantage.name} compares "
            f"responses within a group, so it needs at least 2; got {cfg.rollout.n_samples_per_prompt}")
    responses = cfg.train.prompts_per_step * cfg.rollout.n_samples_per_prompt
    if cfg.train.prompts_per_step % cfg.train.updates_per_step:
        raise ConfigError(
            f"train.updates_per_step: {cfg.train.updates_per_step} mini-batches must split "
            f"train.prompts_per_step={cfg.train.prompts_per_step} whole groups evenly")
    if cfg.train.micro_batch_size % cfg.rollout.n_samples_per_prompt:
        raise ConfigError(
            f"train.micro_batch_size: {cfg.train.micro_batch_size} is not a multiple of "
            f"rollout.n_samples_per_prompt={cfg.rollout.n_samples_per_prompt}; a micro-batch holds "
            "whole groups (their statistics need no gather), so use a multiple of the group size")
    if cfg.train.micro_batch_size > responses:
        raise ConfigError(
            f"train.micro_batch_size: {cfg.train.micro_batch_size} exceeds the {responses} responses "
            "of a step (train.prompts_per_step x rollout.n_samples_per_prompt)")
    if cfg.data.synthetic_min_len > cfg.data.synthetic_max_len:
        raise ConfigError(f"data.synthetic_min_len: {cfg.data.synthetic_min_len} exceeds "
                          f"data.synthetic_max_len={cfg.data.synthetic_max_len}")
    # lazy: only validation needs it (and model.build pulls transformers)
    from megatron_rl.config.train import LOGGERS

    unknown = [t for t in cfg.train.loggers if t not in LOGGERS]
    if unknown:
        raise ConfigError(f"train.loggers: unknown {', '.join(map(repr, unknown))}; known: "
                          f"{', '.join(LOGGERS)}")
    if cfg.train.val_every and not cfg.data.val_path:
        raise ConfigError(f"train.val_every: {cfg.train.val_every} needs data.val_path (a "
                          "validation set); set it, or train.val_every=0")
    if cfg.rollout.ignore_eos and cfg.algo.overlong.buffer_len:
        raise ConfigError(
            "algo.overlong.buffer_len: rollout.ignore_eos makes every response "
            "rollout.max_response_len long, so the overlong penalty would hit all of them; set "
            "algo.overlong.buffer_len=0")
    if cfg.algo.overlong.buffer_len > cfg.rollout.max_response_len:
        raise ConfigError(
            f"algo.overlong.buffer_len: {cfg.algo.overlong.buffer_len} exceeds "
            f"rollout.max_response_len={cfg.rollout.max_response_len}")


def _check_env(cfg: RunConfig) -> None:
    """What multi-turn episodes do not combine with (refused rather than trained wrongly)."""
    if cfg.rollout.ignore_eos:
        raise ConfigError("rollout.ignore_eos: a multi-turn turn ends at its end-of-turn token; "
                          "set rollout.ignore_eos=false with env.name")
    if cfg.env.render == "chat" and not cfg.data.chat_template:
        raise ConfigError("env.render: chat renders observations as chat messages, which needs "
                          "data.chat_template=true (or env.render=plain)")


def _check_critic(cfg: RunConfig) -> None:
    """PPO's value model is a Megatron model beside the policy."""
    if cfg.critic.warmup_steps >= cfg.train.steps:
        raise ConfigError(f"critic.warmup_steps: {cfg.critic.warmup_steps} critic-only steps leave "
                          f"none of train.steps={cfg.train.steps} to train the policy; lower it")


def _check_model(cfg: RunConfig) -> None:
    """The HF config parses and the layout fits the model."""
    # lazy: only validation needs it (and model.build pulls transformers)
    from megatron_rl.model.build import check_model_layout

    hf = cfg.model.hf_model()
    try:
        check_model_layout(hf, cfg.parallel.layout(), cfg.model.options())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    total = cfg.rollout.max_prompt_len + cfg.rollout.max_response_len
    if total > hf.max_position_embeddings:
        # vLLM refuses a max_model_len past the model's positions, deep inside its start-up
        raise ConfigError(
            f"rollout.max_response_len: max_prompt_len + max_response_len = {total} exceeds the "
            f"model's max_position_embeddings={hf.max_position_embeddings}; shorten them, or "
            "raise it with model.hf_overrides.max_position_embeddings if the model supports it")


def check_cpu_engines(cfg: RunConfig, world_size: int, moe: bool) -> None:
    """On vLLM's CPU build, engines side by side fail for MoE models deep in their first step
    (the data-parallel MoE dispatch needs ``all_gatherv``, which the CPU communicator lacks): said
    here instead, with the fix. Call it only where the run is on CPU."""
    if cfg.rollout.placement == "separate":
        world_size = cfg.rollout.engine_ranks
    engines = world_size // cfg.rollout.tensor_parallel_size
    if moe and engines > 1:
        raise ConfigError(
            f"rollout.tensor_parallel_size: {cfg.rollout.tensor_parallel_size} with {world_size} "
            f"processes makes {engines} vLLM engines side by side, which vLLM's CPU build cannot "
            "run for an MoE model (its MoE dispatch needs all_gatherv); on CPU set "
            f"rollout.tensor_parallel_size={world_size}")


def trainer_world(cfg: RunConfig, world_size: int) -> int:
    """The ranks that train: all of them colocated, all but the engine ranks separate."""
    r = cfg.rollout
    if r.placement == "colocated":
        return world_size
    if r.engine_ranks >= world_size:
        raise ConfigError(f"rollout.engine_ranks: {r.engine_ranks} leaves no trainer rank in a "
                          f"world of {world_size}; launch more processes or use fewer engine ranks")
    return world_size - r.engine_ranks


def validate_world(cfg: RunConfig, world_size: int) -> int:
    """Checks the parallel layout and the batch split against the launched world size (or a
    simulated one: recipes for 32 GPUs validate on a laptop); returns the DP size."""
    engines_world = cfg.rollout.engine_ranks if cfg.rollout.placement == "separate" else world_size
    world_size = trainer_world(cfg, world_size)
    dp = cfg.parallel.data_parallel_size(world_size)
    per_update = dp * cfg.train.updates_per_step
    if cfg.train.prompts_per_step % per_update:
        raise ConfigError(
            f"train.prompts_per_step: {cfg.train.prompts_per_step} prompts must split evenly into "
            f"{cfg.train.updates_per_step} update(s) x {dp} data-parallel rank(s) (world size "
            f"{world_size}); use a multiple of {per_update}")
    if engines_world % cfg.rollout.tensor_parallel_size:
        raise ConfigError(
            f"rollout.tensor_parallel_size: {cfg.rollout.tensor_parallel_size} does not divide the "
            f"world size {engines_world}")
    return dp
