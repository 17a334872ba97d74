"""Everything a run needs before its first step, from the config: the Megatron model and optimizer
with their starting weights, the frozen reference, the tokenizer and prompts, and the vLLM engine.

Starting weights, in order of precedence: the newest checkpoint in ``train.output_dir`` (resume),
``model.init_from`` (a ``convert import`` checkpoint), the safetensors of ``model.hf_config``
when it is a model directory, else Megatron's random initialisation seeded by ``train.seed``. The
reference snapshot is always taken from the starting weights *before* a resume overwrites them,
so a resumed run regularises toward the same policy.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import torch

from megatron_rl.algo.advantages import reward_kl_coef
from megatron_rl.checkpoint.convert import write_hf_model
from megatron_rl.checkpoint.dist_ckpt import (checkpoint_steps, load_checkpoint, load_model,
                                              read_latest, step_dir, verify_checkpoint)
from megatron_rl.checkpoint.hf_io import HFReader
from megatron_rl.checkpoint.hf_mapping import mapping_for, value_model_config, value_model_mapping
from megatron_rl.checkpoint.hf_weights import load_hf_weights
from megatron_rl.checkpoint.manifest import CheckpointError
from megatron_rl.config import ConfigError, RunConfig, to_yaml
from megatron_rl.config.drift import training_changes
from megatron_rl.data.prompts import (load_prompts, PromptRow, PromptSampler, render_prompt,
                                      with_template_kwargs)
from megatron_rl.data.synthetic import TASKS, make_rows, word_tokenizer
from megatron_rl.io_errors import reported_writes
from megatron_rl.parallel.rollout_comm import EngineChannel
from megatron_rl.rollout.multiturn import EpisodeRunner
from megatron_rl.rollout.routes import RouteSpec
from megatron_rl.runtime.model_setup import build_model, unwrap
from megatron_rl.runtime.parallel_init import weight_groups
from megatron_rl.train.critic import Critic, copy_trunk, load_critic_init
from megatron_rl.train.optimizer import OptimSettings, build_optimizer
from megatron_rl.train.rl_batch import StepPlan
from megatron_rl.train.rollout_batch import BatchShape


@dataclass
class ModelState:
    """The policy on this rank: model chunks, optimizer, scheduler and the HF mapping."""
    model: List[Any]
    optimizer: Any
    scheduler: Any
    hf: Any
    hf_cfg: dict
    mapping: Any
    groups: Any          # parallel.groups.ParallelGroups (loss path)
    weight_groups: Any   # checkpoint.hf_weights.ShardGroups
    dtype: torch.dtype


def needs_reference(cfg: RunConfig) -> bool:
    """A reference pass costs a forward: run it only when a KL uses it."""
    adv, loss = cfg.algo.advantage, cfg.algo.loss
    # future_kl_grpo takes a KL tensor even at beta 0
    kl_in_adv = adv.name == "future_kl_grpo" or reward_kl_coef(adv.name, adv.params) != 0.0
    return kl_in_adv or float(loss.params.get("kl_coef", 0.0)) != 0.0


def _hf_dir(cfg: RunConfig) -> Optional[Path]:
    p = Path(cfg.model.hf_config)
    if cfg.model.hf_config.startswith("tiny:") or not cfg.model.hf_config:
        return None
    return p if p.is_dir() else p.parent


def engine_loadable_hf_dir(cfg: RunConfig) -> Optional[Path]:
    """``model.hf_config``'s directory when vLLM can start from it as it is: it holds the weights,
    its config.json is the trainer's (``model.hf_overrides`` change nothing in it) and its
    tokenizer is the run's.
    Then no ``<output_dir>/hf_init`` copy of the starting weights is written (61 GB for
    Qwen3-30B-A3B); weights that are not the directory's (a resume, ``model.init_from``) are
    synced into the engine before the first step instead."""
    import json

    d = _hf_dir(cfg)
    if d is None or cfg.data.tokenizer not in ("", str(d)) or not glob.glob(str(d / "*.safetensors")):
        return None
    try:
        on_disk = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return None
    same = all(on_disk.get(k) == v for k, v in cfg.model.hf_overrides.items())
    return d if same else None


def step_plan(cfg: RunConfig, needs_reference: bool):
    """The ``rl_batch.StepPlan`` of the algo, train and rollout sections."""
    a, t = cfg.algo, cfg.train
    return StepPlan(
        a.advantage.name, dict(a.advantage.params), a.loss.name, a.loss_params(),
        kl_estimator=a.kl_estimator, kl_source=a.kl_source,
        kl_clamp_log_ratio=a.kl_clamp_log_ratio, kl_clamp_value=a.kl_clamp_value,
        updates=t.updates_per_step, epochs=t.epochs_per_step, seed=t.seed,
        temperature=cfg.rollout.temperature, needs_reference=needs_reference,
        routing_replay=t.routing_replay, behaviour=a.mismatch.behaviour, packed=t.pack_sequences)


def plan_warnings(cfg: RunConfig, plan: StepPlan, critic: bool) -> List[str]:
    """Settings the step's plan makes idle (the run is right, the knob does nothing)."""
    budget = cfg.train.logprob_max_tokens_per_micro_batch
    if budget and not (plan.old_pass or plan.needs_reference or critic):
        return [f"train.logprob_max_tokens_per_micro_batch={budget} has no effect: no "
                "forward-only pass runs (the old log-probs come from the update's own forward, "
                "and there is no reference KL or critic)"]
    return []


def route_spec(cfg: RunConfig, hf):
    """The ``rollout.routes.RouteSpec`` the engine returns routes for, or None (not asked)."""
    wanted = cfg.train.routing_replay == "rollout" or cfg.rollout.return_routes
    return RouteSpec.of(hf) if wanted else None


def batch_shape(cfg: RunConfig, dp: int, dp_rank: int, cp_rank: int, spec, routes):
    """The ``rollout_batch.BatchShape`` of this rank (``spec``: ``route_spec``'s; ``routes``:
    the policy's ``RouteControl`` on this stage, or None)."""
    t = cfg.train
    return BatchShape(
        dp, dp_rank, max(1, t.micro_batch_size // cfg.rollout.n_samples_per_prompt),
        cfg.parallel.context_parallel_size, cp_rank, t.pack_sequences, cfg.algo.advantage.name,
        route_shape=None if spec is None else (len(spec.layers), spec.top_k),
        route_layers=None if routes is None else routes.layers,
        replay_rollout_routes=t.routing_replay == "rollout",
        max_tokens=t.max_tokens_per_micro_batch, updates=t.updates_per_step,
        tp_size=cfg.parallel.tensor_model_parallel_size,
        logprob_max_tokens=t.logprob_max_tokens_per_micro_batch)


def optim_settings(section, train):
    """``OptimSettings`` from the optimizer keys a section shares (``train`` or ``critic``: lr,
    min_lr, lr_warmup_steps, lr_decay_style, weight_decay, max_grad_norm); the schedule's length
    counts every update of the run (``train``'s steps x updates x epochs)."""
    return OptimSettings(lr=section.lr, min_lr=section.min_lr, weight_decay=section.weight_decay,
                         max_grad_norm=section.max_grad_norm, warmup_steps=section.lr_warmup_steps,
                         total_steps=train.steps * train.updates_per_step * train.epochs_per_step,
                         decay_style=section.lr_decay_style, adam_beta2=train.adam_beta2)


def build_model_state(cfg: RunConfig, hf, layout, pg) -> ModelState:
    """The policy's model, distributed optimizer and HF name mapping in ``layout``."""
    opt = cfg.model.options()
    model, _ = build_model(hf, layout, opt, distributed_optimizer=True)
    t = cfg.train
    optimizer, scheduler = build_optimizer(model, optim_settings(t, t), opt.params_dtype)
    try:
        mapping = mapping_for(hf)
    except ValueError as e:
        raise ConfigError(f"model.hf_config: {e}") from None
    return ModelState(model, optimizer, scheduler, hf, cfg.model.hf_dict(), mapping, pg,
                      weight_groups(), opt.params_dtype)


def build_critic(cfg: RunConfig, hf, layout, pg, policy: ModelState):
    """PPO's critic (``train.critic.Critic``) in the policy's layout, initialised from
    ``critic.init_from`` or else the policy's starting weights (call after
    ``load_starting_weights``); returns ``(critic, where its weights came from)``."""
    c, t = cfg.critic, cfg.train
    opt = cfg.model.options()   # the critic's routers are its own: it never replays the policy's routes
    model, _ = build_model(hf, layout, opt, distributed_optimizer=True, value_head=True,
                           value_head_init_std=c.head_init_std)
    optimizer, scheduler = build_optimizer(model, optim_settings(c, t), opt.params_dtype)
    if c.init_from:
        try:
            source = load_critic_init(c.init_from, model)
        except ValueError as e:
            raise ConfigError(f"critic.init_from: {e}") from None
    else:
        copy_trunk(policy.model, model)
        source = "the policy's starting weights, a fresh head"
    optimizer.reload_model_params()
    return Critic(model, optimizer, scheduler, pg, clip=c.value_clip or None,
                  agg=c.loss_agg), source


def build_reward_model(cfg: RunConfig, layout, pg):
    """The learned reward model (``reward.model``) in the policy's layout, or None when no reward
    uses it (collective)."""
    if not cfg.reward.uses_model():
        return None
    from megatron_rl.rewards.learned import RunningMoments
    from megatron_rl.train.reward_model import load_reward_model

    m = cfg.reward.model
    rm = load_reward_model(_reward_model_dir(m.path, cfg.train.output_dir), layout, cfg.model.options(), pg,
                           packed=cfg.train.pack_sequences, micro_batch_tokens=m.micro_batch_tokens,
                           use_chat_template=m.use_chat_template, offload=m.offload)
    rm.weight, rm.clip = cfg.reward.model_weight(), m.clip
    rm.moments = RunningMoments() if m.normalize == "running" else None
    return rm


def _reward_model_dir(path: str, output_dir: str) -> str:
    """``reward.model.path``, the demo's ``tiny:digit_score`` made (by rank 0, ~10 s) under
    ``output_dir`` on first use."""
    import torch.distributed as dist

    from megatron_rl.rewards.config import TINY_RM

    if path != TINY_RM:
        return path
    made = Path(output_dir) / "tiny_rm"
    if dist.get_rank() == 0 and not (made / "config.json").is_file():
        from megatron_rl.rewards.tiny_rm import train_tiny_rm

        train_tiny_rm(str(made))
    dist.barrier()
    return str(made)


def load_starting_weights(cfg: RunConfig, ms: ModelState) -> str:
    """The pre-resume weights (see the module doc); returns where they came from."""
    d = _hf_dir(cfg)
    if cfg.model.init_from:
        try:
            load_model(cfg.model.init_from, ms.model[0])
        except ValueError as e:
            raise ConfigError(f"model.init_from: {e}") from None
        source = cfg.model.init_from
    elif d is not None and glob.glob(str(d / "*.safetensors")):
        try:
            load_hf_weights(unwrap(ms.model[0]), HFReader(d), ms.mapping, ms.weight_groups,
                            ms.hf.num_experts)
        except ValueError as e:
            raise ConfigError(f"model.hf_config: {e}") from None
        source = str(d)
    else:
        return f"random init (seed {cfg.train.seed})"
    ms.optimizer.reload_model_params()  # the optimizer's fp32 main weights follow the model
    return source


def resume_checkpoint(root: Path, ms: ModelState, fallback: bool,
                      layout: Optional[dict] = None, critic=None) -> tuple:
    """Load the newest complete checkpoint under ``root`` (collective): ``(trainer_state or None,
    warnings)``, the state's ``"path"`` being the directory loaded.

    The ``step_*`` directories are scanned, newest first; ``latest`` is only compared with the
    choice (a deleted, cut or garbled pointer is reported, never trusted). A checkpoint that fails
    its manifest is an error naming the file, unless ``fallback`` allows the next older one.
    Checkpoints present but none complete (or a pointer with no directory left) stop the run:
    it never silently starts over."""
    latest, pointer_problem = read_latest(root)
    steps = checkpoint_steps(root)
    if not steps:
        if latest is None and not (root / "latest").exists():
            return None, []
        raise CheckpointError(f"{root}: `latest` exists but no step_* checkpoint directory is "
                              "left; restore them, or choose a new train.output_dir")
    warned = []
    for step in steps:
        try:
            verify_checkpoint(step_dir(root, step))
        except CheckpointError as e:
            if not fallback:
                raise CheckpointError(f"{e}; restore it, or set train.resume_fallback=true to "
                                      "resume from the newest earlier checkpoint that is complete") from None
            warned.append(f"skipping a damaged checkpoint: {e}")
            continue
        if latest != step:
            said = pointer_problem or f"{root / 'latest'} names step {latest}"
            warned.append(f"{said}, but the newest complete checkpoint is step_{step:08d}: "
                          "resuming from it")
        state = load_checkpoint(step_dir(root, step), ms.model[0], ms.optimizer, ms.scheduler,
                                verify=False, layout=layout,
                                critic=None if critic is None else
                                (critic.model[0], critic.optimizer, critic.scheduler))
        return {**state, "path": str(step_dir(root, step))}, warned
    raise CheckpointError(f"{root}: no complete checkpoint to resume from ({'; '.join(warned)}); "
                          "restore one, or choose a new train.output_dir to start over")


def config_tree(cfg: RunConfig) -> dict:
    """The resolved config as plain nested dicts (saved with each checkpoint)."""
    import yaml

    return yaml.safe_load(to_yaml(cfg))


def refuse_drift(saved: Optional[dict], cfg: RunConfig, checkpoint: Path) -> None:
    """A resume whose training settings differ from the checkpoint's (``config.drift``) is refused,
    naming them, unless ``train.resume=force``. Checkpoints older than the saved config pass."""
    if saved is None or cfg.train.resume == "force":
        return
    changes = training_changes(saved, config_tree(cfg), config_tree(RunConfig()))
    if changes:
        more = f" (and {len(changes) - 4} more)" if len(changes) > 4 else ""
        raise ConfigError(
            f"train.resume: {checkpoint} was trained with other settings: {'; '.join(changes[:4])}"
            f"{more}. Resuming would mix two runs: restore those settings, choose a new "
            "train.output_dir, or set train.resume=force to continue with the new ones")


def refuse_to_overwrite(root: Path) -> None:
    """``train.resume=false`` in a directory with checkpoints would overwrite and prune them."""
    steps = checkpoint_steps(root)
    if steps:
        raise ConfigError(f"train.resume: false, but {root} holds checkpoints (newest "
                          f"step_{steps[0]:08d}) that a new run would overwrite; choose a new "
                          "train.output_dir, or move them away to start over")


def load_tokenizer(cfg: RunConfig, hf, model_dir: Optional[str] = None):
    """``data.tokenizer``: ``word`` (the synthetic tasks'), a directory, or the model's own
    (``model_dir``, default ``model.hf_config``'s directory)."""
    name = cfg.data.tokenizer
    if name == "word":
        tok = word_tokenizer()
    else:
        own = model_dir or (str(_hf_dir(cfg)) if _hf_dir(cfg) else "")
        where = name or own
        if not where:
            raise ConfigError("data.tokenizer: model.hf_config is a tiny built-in model with no "
                              "tokenizer; set data.tokenizer=word (synthetic tasks) or a directory")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.tokenizer: cannot load a tokenizer from {where} "
                              f"({str(e).splitlines()[0][:200]})") from None
    if len(tok) > hf.vocab_size:
        raise ConfigError(f"data.tokenizer: {len(tok)} tokens do not fit the model's vocabulary "
                          f"of {hf.vocab_size} (model.hf_config)")
    if tok.eos_token_id is None:
        raise ConfigError("data.tokenizer: has no end-of-sequence token; responses could not stop")

    return with_template_kwargs(tok, dict(cfg.data.chat_template_kwargs))


def load_rows(cfg: RunConfig, notes: Optional[List[str]] = None,
              validation: bool = False) -> List[PromptRow]:
    """The dataset's rows (``validation``: ``data.val_path``'s; a synthetic validation set is
    drawn with another seed); what was skipped (``data.on_bad_row`` / ``on_missing_label=skip``)
    is appended to ``notes`` as one line with the count and the first reason."""
    d = cfg.data
    path, key = (d.val_path, "data.val_path") if validation else (d.path, "data.path")
    if path.startswith("synthetic:"):
        task = path[len("synthetic:"):]
        if task not in TASKS:
            raise ConfigError(f"{key}: unknown synthetic task {task!r}; known: "
                              f"{', '.join(sorted(TASKS))}")
        try:
            raw = make_rows(task, d.synthetic_rows, min_len=d.synthetic_min_len,
                            max_len=d.synthetic_max_len, seed=d.seed + int(validation) * 7919,
                            answer_len=d.synthetic_answer_len)
        except ValueError as e:
            raise ConfigError(f"data.synthetic_answer_len: {e}") from None
        return [PromptRow(i, r["prompt"], r["label"], r["metadata"]) for i, r in enumerate(raw)]
    try:
        report = load_prompts(path, prompt_key=d.prompt_key, label_key=d.label_key,
                              on_bad_row=d.on_bad_row, on_missing_label=d.on_missing_label)
    except ValueError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith("data.") else f"{key}: {msg}") from None
    if report.skipped and notes is not None:
        place, why = report.skipped[0]
        notes.append(f"data: {len(report.skipped)} row(s) of {path} skipped, "
                     f"{len(report.rows)} kept; the first at {place}: {why}")
    return report.rows


class PromptStream:
    """This rank's prompts: ``draw(k)`` the next ``k`` rows with their token ids. ``rows`` is
    already this rank's share (sharded mode) or every row (replicated generation)."""

    def __init__(self, rows: List[PromptRow], tokenizer, *, chat: bool, max_tokens: int,
                 seed: int, shuffle: bool, drop_too_long: bool = False):
        self.tok, self.chat, self.max_tokens = tokenizer, chat, max_tokens
        self.rows, self.dropped = self._measured(rows, drop_too_long)
        self.sampler = PromptSampler(len(self.rows), seed=seed, shuffle=shuffle)

    def _measured(self, rows: List[PromptRow], drop: bool):
        """Every prompt rendered once now, so that a prompt too long for the engine (or a chat
        template the tokenizer lacks) fails before the first step, not when the sampler reaches
        it hours later. ``drop``: leave over-long rows out instead (``data.on_bad_row=skip``).
        The ids are not kept: ``draw`` renders a step's few prompts again, which costs less than
        holding every row's ids as Python lists for the whole run."""
        kept = []
        for row in rows:
            try:
                render_prompt(row, self.tok, chat=self.chat, max_tokens=self.max_tokens)
            except ValueError as e:
                if drop and "max_prompt_len" in str(e):
                    continue
                hint = ("; raise rollout.max_prompt_len or set data.on_bad_row=skip to drop such rows"
                        if "max_prompt_len" in str(e) else "")
                raise ConfigError(f"data: {e}{hint}") from None
            kept.append(row)
        if not kept:
            raise ConfigError(f"data: every prompt is longer than rollout.max_prompt_len={self.max_tokens}")
        return kept, len(rows) - len(kept)

    def draw(self, k: int):
        """The next ``k`` prompts as ``(row, token ids)``, in the sampler's order."""
        out = []
        for i in self.sampler.next_indices(k):
            row = self.rows[i]
            try:
                ids = render_prompt(row, self.tok, chat=self.chat, max_tokens=self.max_tokens)
            except ValueError as e:
                raise ConfigError(f"data: {e}") from None
            out.append((row, ids))
        return out


def prompt_stream(cfg: RunConfig, tok, rows) -> PromptStream:
    """The run's prompts over ``rows``: every rank that generates draws the same ones."""
    d = cfg.data
    return PromptStream(rows, tok, chat=d.chat_template, max_tokens=cfg.rollout.max_prompt_len,
                        seed=d.seed, shuffle=d.shuffle, drop_too_long=d.on_bad_row == "skip")


def episode_runner(cfg: RunConfig, tok, hf, rank: int, world: int):
    """``cfg.env``'s multi-turn episodes on the engines of a ``world``-rank group (this process
    being ``rank``), or None without an environment."""
    if not cfg.env.name:
        return None

    r = cfg.rollout
    return EpisodeRunner.from_sections(
        cfg.env, cfg.reward, tok, max_response_len=r.max_response_len, vocab_size=hf.vocab_size,
        chat_template=cfg.data.chat_template, temperature=r.temperature, top_p=r.top_p,
        channel=EngineChannel(rank, world, r.tensor_parallel_size))


def export_models(out: Path, ms: ModelState, tokenizer, critic, step: int) -> None:
    """The policy as an HF directory at ``out`` and, for PPO, the critic at ``<out>_critic`` as
    the architecture's token classifier (collective; rank 0 writes)."""
    import torch.distributed as dist

    after = (f"the final checkpoint (step {step}) is complete; free space and export it "
             "with `megatron-rl convert export`")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    models = [(out, "the Hugging Face export", ms.model[0], ms.mapping, ms.hf_cfg)]
    if critic is not None:
        models.append((out.with_name(out.name + "_critic"), "the critic's Hugging Face export",
                       critic.model[0], value_model_mapping(ms.mapping), value_model_config(ms.hf_cfg)))
    for where, what, model, mapping, hf_cfg in models:
        with reported_writes(what, where, after):
            write_hf_model(model, ms.hf, mapping, ms.weight_groups, hf_cfg, where, ms.dtype)
            if rank0:
                tokenizer.save_pretrained(str(where))
