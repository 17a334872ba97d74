"""The RL loop on Megatron-Core with vLLM rollouts, colocated in one process per rank:

    for step:  prompts -> rollouts (G per prompt; DAPO refill) -> rewards
               -> old / reference log-probs -> advantages -> N updates over mini-batches
               -> weight sync into vLLM (bucketed) -> metrics -> checkpoint

Generation: the world is cut into engines of ``rollout.tensor_parallel_size`` ranks (vLLM's
external launcher; its data parallelism over the engines). Every rank draws the same prompts; each
engine generates and scores its share; one all-gather of the samples (token ids, log-probs,
scores) gives every rank the step's rollouts, and each training data-parallel rank takes its own
whole groups. The rollout layout is thereby independent of the training layout.
On GPU the engine sleeps while Megatron trains and wakes for the weight sync.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rl.checkpoint.convert import write_side_files
from megatron_rl.checkpoint.dist_ckpt import checkpoint_steps, load_rng_state, save_checkpoint
from megatron_rl.config import ConfigError, RunConfig, to_yaml, validate_world
from megatron_rl.config.run import check_cpu_engines
from megatron_rl.config.soundness import load_warnings
from megatron_rl.model.cpu_modes import cpu_modes_suspended
from megatron_rl.model.routing_replay import route_control
from megatron_rl.observe import PhasePeaks, RunLog, memory_metrics, summarise_run
from megatron_rl.parallel.collectives import all_reduce_nograd
from megatron_rl.parallel.launch import init_distributed
from megatron_rl.parallel.metrics_comm import reduce_step_metrics
from megatron_rl.parallel.roles import init_roles
from megatron_rl.rewards.http import EXIT_UNAVAILABLE, ServiceDown
from megatron_rl.rollout.collect import sample_rows
from megatron_rl.rollout.rollout_state import IN_FLIGHT_ROUTES, load_routes, save_routes
from megatron_rl.rollout.scoring import Scorer
from megatron_rl.runtime.crash_points import reached
from megatron_rl.runtime.parallel_init import (compute_device, destroy_megatron_parallel,
                                               init_megatron_parallel)
from megatron_rl.runtime.preempt import EXIT_NONFINITE, EXIT_REQUEUE, mark_requeue
from megatron_rl.trackers import check_installed, make_trackers
from megatron_rl.train import rl_batch, setup as S
from megatron_rl.train.async_feed import AsyncFeed
from megatron_rl.train.critic import explained_variance_sums
from megatron_rl.train.engine_link import EngineLink
from megatron_rl.train.engine_worker import run_engine_rank
from megatron_rl.train.moe_stats import RouterLoad
from megatron_rl.train.producer import RolloutProducer
from megatron_rl.train.reference import HostWeights
from megatron_rl.train.rollout_batch import RouteStash, step_batch
from megatron_rl.train.run_dir import claim_output_dir
from megatron_rl.train.setup import export_models
from megatron_rl.train.step_metrics import BadSteps, derive, rank_shares
from megatron_rl.train.validation import Validation


class Trainer(EngineLink):
    """One run on this rank: engine, policy (and critic), data, logs; ``run`` trains to
    ``train.steps``."""
    def __init__(self, cfg: RunConfig, quiet: bool = False, roles=None):
        self.cfg, self.quiet, self.roles = cfg, quiet, roles   # roles: separate placement
        if cfg.train.loggers:   # before anything starts: a missing package is one line

            try:
                check_installed(cfg.train.loggers)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.world = init_distributed() if roles is None else roles.size   # the trainer ranks
        self.rank = dist.get_rank()
        self.dp = validate_world(cfg, self.world if roles is None else roles.world)
        if not torch.cuda.is_available() and roles is None:   # separate: checked before the split
            check_cpu_engines(cfg, self.world, bool(cfg.model.hf_model().num_experts))
        self.engine_tp = cfg.rollout.tensor_parallel_size
        self.n_engines = (self.world if roles is None else roles.engine_ranks) // self.engine_tp
        self.out = Path(cfg.train.output_dir)
        self.engine, self.log, self.feed, self.feed_started = None, None, None, False
        self.push_metrics: Dict[str, float] = {}   # the last weight push, reported with the next step
        if roles is not None:
            self.feed = AsyncFeed(roles, cfg.rollout.max_staleness, cfg.train.steps)
        self.run_id, self.lock, self.stop = claim_output_dir(self.out, self.rank,
                                                             cfg.train.preempt_grace_s)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        cfg, quiet = self.cfg, self.quiet
        layout = cfg.parallel.layout()
        self.layout_sizes = layout.sizes(self.world)   # recorded with checkpoints
        self.hf = cfg.model.hf_model()
        self.route_spec = S.route_spec(cfg, self.hf)   # the engine returns expert routes (R3)
        self.pg = init_megatron_parallel(layout, cfg.train.seed)
        self.ms = S.build_model_state(cfg, self.hf, layout, self.pg)
        self.source = self.weights_from = S.load_starting_weights(cfg, self.ms)
        self.reference = None
        if S.needs_reference(cfg):
            self.reference = HostWeights(self.ms.model)
        self.critic = None
        if cfg.algo.advantage.name == "gae":
            self.critic, critic_from = S.build_critic(cfg, self.hf, layout, self.pg, self.ms)
            self.source += f"; critic from {critic_from}"
        self.tok = S.load_tokenizer(cfg, self.hf)
        self.scorer = Scorer.of(cfg.reward, self.tok)
        self.reward_model = S.build_reward_model(cfg, layout, self.pg)   # None without one
        self.episodes = None   # separate placement: played on the engine ranks
        if self.roles is None:
            self.episodes = S.episode_runner(cfg, self.tok, self.hf, self.rank, self.world)
        self.warnings: List[str] = load_warnings(cfg)
        self._data()
        self.val = None
        if cfg.train.val_every:
            self.val = Validation.of(cfg, self.tok, S.load_rows(cfg, self.warnings, validation=True))
        self.step = 0
        self.bad = BadSteps(cfg.train.max_bad_steps)
        self.resumed_from = None
        self.last: Dict[str, float] = {}
        self._resume()
        # a stop during start-up: leave before the engine starts and before anything is written
        self.stopped_early = self._agreed(self.stop.local())
        if self.stopped_early:
            return
        if self.roles is None:
            self.engine = self._engine()
        else:
            self._start_engines()
        if self.resumed_from is not None:  # the engine's start-up drew random numbers

            load_rng_state(self.resumed_from)
        self.plan = S.step_plan(cfg, self.reference is not None)
        self.warnings += S.plan_warnings(cfg, self.plan, self.critic is not None)

        self.router_load = RouterLoad(self.ms.model) if self.hf.num_experts else None
        self.routes = route_control(self.ms.model[0])   # None on a dense model or stage
        self.route_stash = None   # separate placement: the routes come inside the rollouts
        if self.route_spec is not None and self.roles is None:
            self.route_stash = RouteStash(range(0, self.world, self.engine_tp))
        self.producer = None
        if self.roles is None:
            self.producer = RolloutProducer(cfg, self.tok, self.prompts, self.scorer, self.episodes,
                                            self.rank, self.world, self.route_stash,
                                            self.reward_model)
            self.producer.engine = self.engine
        if self.rank == 0:
            self.log = RunLog(self.out, cfg.train.steps, config_yaml=to_yaml(cfg),
                              tensorboard="tensorboard" in cfg.train.loggers, quiet=quiet, start_step=self.step,
                              trackers=self._trackers())
            for w in self.warnings:
                self.log.note(f"warning: {w}")
            where = "" if self.roles is None else (
                f" on {self.roles.engine_ranks} rank(s) of their own, "
                f"{cfg.rollout.max_staleness} step(s) off-policy")
            self.log.note(f"model: {self.hf.architecture} from {self.source}; world {self.world} "
                          f"(DP {self.dp}); {self.n_engines} vLLM engine(s) of TP {self.engine_tp}"
                          f"{where}; starting at step {self.step + 1}")

    # ---- setup pieces ---------------------------------------------------------------------
    def _trackers(self) -> list:
        return make_trackers(self.cfg.train.loggers, self.out, self.cfg.train.tracker_project,
                             self.out.name, S.config_tree(self.cfg))

    def _data(self) -> None:
        rows = S.load_rows(self.cfg, self.warnings)
        self.dp_rank = ps.get_data_parallel_rank()
        self.prompts = S.prompt_stream(self.cfg, self.tok, rows)
        if self.prompts.dropped:
            self.warnings.append(f"{self.prompts.dropped} prompt(s) longer than "
                                 f"rollout.max_prompt_len={self.cfg.rollout.max_prompt_len} left out "
                                 "(data.on_bad_row=skip)")

    def _resume(self) -> None:
        if self.cfg.train.resume == "false":
            S.refuse_to_overwrite(self.out / "checkpoints")
            return
        state, warned = S.resume_checkpoint(self.out / "checkpoints", self.ms,
                                            self.cfg.train.resume_fallback,
                                            self.layout_sizes, critic=self.critic)
        self.warnings += warned
        if state is None:
            return
        S.refuse_drift(state.get("config"), self.cfg, Path(state["path"]))
        self.step = int(state["step"])
        self.resumed_from = Path(state["path"])
        self.prompts.sampler.load_state_dict(state["sampler"])
        if self.reward_model is not None and self.reward_model.moments is not None \
                and "reward_moments" in state:
            self.reward_model.moments.load_state_dict(state["reward_moments"])
        if self.feed is not None:
            routes = self.resumed_from / IN_FLIGHT_ROUTES
            self.feed.load(state.get("in_flight"), load_routes(routes) if routes.is_file() else None)
        self.source += f", resumed from step {self.step}"

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> int:
        """Train to ``train.steps``; returns 0, ``EXIT_REQUEUE`` after a requested stop, or
        ``EXIT_NONFINITE`` after ``train.max_bad_steps`` NaN steps (a checkpoint written first)."""
        stop = self.stop
        if self.stopped_early or self._agreed(stop.local()):   # asked during the engine start
            return self._stop_at_startup()
        try:
            while self.step < self.cfg.train.steps:
                self.step += 1
                self.last = self.train_step()
                self.last.update(self._validation())
                if self.log is not None and (self.step % self.cfg.train.log_every == 0
                                             or self.step == self.cfg.train.steps):
                    self.log.log(self.step, self.last)
                self._write_samples()
                every = self.cfg.train.checkpoint_every
                due = (every and self.step % every == 0) or self.step == self.cfg.train.steps
                if due:
                    self.save()
                if self._too_many_bad_steps():
                    if not due:
                        self.save()
                    return EXIT_NONFINITE
                if self.step < self.cfg.train.steps and self._agreed(stop.local()):
                    if not due:
                        self.save()
                    if self.log is not None:
                        self.log.note(f"stopping after step {self.step} ({stop.reason()}): "
                                      f"checkpoint complete {stop.elapsed():.1f} s after the request "
                                      f"(grace {self.cfg.train.preempt_grace_s:g} s); rerun the "
                                      "same command to resume")
                    if self.rank == 0:
                        mark_requeue(self.out, f"stopped after step {self.step} ({stop.reason()})")
                    return EXIT_REQUEUE
                # after the stop check: a stopped run never pushes a version whose rollouts its
                # checkpoint (save: feed.fill) would not hold
                if self.feed is not None:
                    self._push()
            if self.cfg.train.export_hf:
                self.export(self.out / "hf")
            self._finish()
            return 0
        finally:
            stop.close()

    def _write_samples(self) -> None:
        every = self.cfg.train.samples_every
        if self.log is not None and every and self.step % every == 0:
            decode = lambda ids: self.tok.decode(ids, skip_special_tokens=True)  # noqa: E731
            self.log.samples(self.step, sample_rows(self.rollouts, decode,
                                                    self.cfg.train.samples_per_step))

    def _stop_at_startup(self) -> int:
        self.stop.close()
        if self.feed is not None and not self.feed_started:
            self.feed.stop(EXIT_REQUEUE, started=False)
        if self.rank == 0:
            where = f"step {self.step}'s checkpoint" if self.step else "the start"
            line = (f"megatron-rl: stop requested during start-up ({self.stop.reason()}); nothing "
                    f"was trained or written; the requeued run starts again from {where}")
            print(line, file=sys.stderr, flush=True)
            mark_requeue(self.out, line)
        return EXIT_REQUEUE

    def _too_many_bad_steps(self) -> bool:
        """``train.max_bad_steps`` reached (``step_metrics.BadSteps``); said in one line."""
        line = self.bad.update(self.step, self.last)
        if line and self.log is not None:
            self.log.note(line)
        return line is not None

    @staticmethod
    def _agreed(flag: bool) -> bool:
        """True on every rank when it is true on any (one MAX all-reduce of one number)."""
        return bool(all_reduce_nograd(torch.tensor([float(flag)]), dist.group.WORLD,
                                      dist.ReduceOp.MAX))

    def train_step(self) -> Dict[str, float]:
        """One RL step; returns its reduced metrics."""
        t0, peaks = time.perf_counter(), PhasePeaks()
        reached("rollout", self.step)
        batch, rollouts = self._rollouts()
        self.rollouts = rollouts
        t1 = time.perf_counter()
        peaks.end("rollout")
        if self.engine is not None:
            self.engine.sleep()
        local: Dict[str, float] = {}
        reached("train", self.step)
        if batch is not None:
            rl_batch.logprob_passes(self.ms.model, batch, self.pg, self.plan, self.reference,
                                    self.router_load, self.critic)
            t2 = time.perf_counter()
            peaks.end("logprob")
            sums = rl_batch.run_updates(self.ms.model, self.ms.optimizer, self.ms.scheduler,
                                        batch, self.pg, self.plan, self.step, self.critic,
                                        train_policy=self.step > self.cfg.critic.warmup_steps
                                        or self.critic is None, router_load=self.router_load)
            if self.router_load is not None:   # counted in the old-policy pass, or the update's
                local.update(self.router_load.metrics())
            if self.routes is not None:   # raw counts: each rank routes other tokens
                local.update(self.routes.agreement_metrics())
            if self.critic is not None:
                sums.update(explained_variance_sums(batch))
            sums.update(rl_batch.mismatch_sums(batch))
            sums.update(rl_batch.advantage_sums(batch))
            local.update(rank_shares(sums, self.cfg.parallel.tensor_model_parallel_size,
                                     self.world))
        else:
            t2 = time.perf_counter()
            local["train/skipped_steps"] = 1.0 / self.world
        t3 = time.perf_counter()
        peaks.end("train")
        if self.engine is not None:
            self.engine.wake_up()
        reached("sync", self.step)
        if batch is not None and self.engine is not None:
            sync = self._sync(self.engine)
            local.update({"sync/seconds": sync.seconds / self.world,
                          "sync/MB": sync.bytes / 2**20 / self.world})
        t4 = time.perf_counter()
        share = 1.0 / self.world  # every rank reports; the sum over ranks is the mean
        for k, v in (batch.plan_metrics if batch is not None else {}).items():
            local[k] = v * share   # the plan is the same on every rank
        for k, v in rollouts.metrics().items():
            local[k] = v * share if not k.endswith("/max") else v
        if self.feed is not None:   # the push before this step (if any) and this step's take
            for k, v in {**self.push_metrics, **self.feed.metrics}.items():
                local[k] = v if k.endswith("_MB") else v * share   # MB: rank 0's, others 0
            self.push_metrics = {}
            local["async/staleness/max"] = self.feed.metrics["async/staleness/mean"]
        if self._probe_due():
            local["sync/probe_mismatch/max"] = self._probe()
        peaks.end("sync")
        local.update(memory_metrics())
        local.update(peaks.metrics())
        local.update({"time/rollout_s": (t1 - t0) * share, "time/logprob_s": (t2 - t1) * share,
                      "time/train_s": (t3 - t2) * share, "time/sync_s": (t4 - t3) * share,
                      "perf/tokens": float(self._tokens(rollouts)) * share})
        m = derive(reduce_step_metrics(local), time.perf_counter() - t0)
        m["train/lr"] = float(self.ms.optimizer.param_groups[0]["lr"])
        if self.critic is not None:
            m["critic/lr"] = self.critic.lr()
        return m

    # ---- pieces of a step -----------------------------------------------------------------
    @cpu_modes_suspended()   # generation, rewards, batch building: no Megatron in them
    def _rollouts(self):
        if self.feed is not None:   # separate placement: from the engine ranks
            rollouts = self.feed.take(self.step)
        else:
            rollouts = self.producer.collect(self.step)
        if rollouts.fatal:   # the reward service is down: stop, the checkpoints as they are
            steps = checkpoint_steps(self.out / "checkpoints")
            where = f"step {steps[0]}'s checkpoint" if steps else "the start (no checkpoint yet)"
            raise ServiceDown(f"step {self.step}: {rollouts.fatal}; nothing of this step was "
                              f"written; rerun the same command to resume from {where}")
        if rollouts.failures and self.log is not None:
            what = "episode" if self.cfg.env.name else "reward"
            self.log.note(f"step {self.step}: {rollouts.failures} {what} failure(s), e.g. "
                          f"{rollouts.first_error}")
        shape = S.batch_shape(self.cfg, self.dp, self.dp_rank, self._cp_rank(), self.route_spec,
                              self.routes)
        return step_batch(rollouts, shape, self.pg, compute_device(), self.route_stash), rollouts

    def _cp_rank(self) -> int:
        return 0 if self.pg.cp is None else dist.get_rank(self.pg.cp)

    def _sample(self, drawn, plan, round_: int):
        """This step's engine-sharded generate-and-score (validation's sampler)."""
        return self.producer.sample(drawn, plan, round_, self.step, validation=True)

    @staticmethod
    def _tokens(rollouts) -> int:
        return sum(len(s.prompt_ids) + len(s.token_ids) for g in rollouts.samples for s in g)

    # ---- outputs --------------------------------------------------------------------------
    def save(self) -> None:
        """A checkpoint of this step (model, optimizer, sampler, config, critic)."""
        state = {"sampler": self.prompts.sampler.state_dict(), "step": self.step,
                 "config": S.config_tree(self.cfg)}
        if self.reward_model is not None and self.reward_model.moments is not None:
            state["reward_moments"] = self.reward_model.moments.state_dict()
        routes: dict = {}
        if self.feed is not None:   # the engines' sampler, and the steps they generated ahead
            self.feed.fill(self.step)
            state["sampler"] = self.feed.sampler or state["sampler"]
            state["in_flight"], routes = self.feed.state()

        def side_files(d: Path) -> None:
            """The HF config and tokenizer beside the shards, and the in-flight R3 routes."""
            write_side_files(d, self.ms.hf_cfg, self.ms.dtype, self.tok, self.critic is not None)
            if routes:   # R3 routes of the in-flight steps: arrays, not JSON
                save_routes(d / IN_FLIGHT_ROUTES, routes)

        save_checkpoint(self.out / "checkpoints", self.step, self.ms.model[0], self.ms.optimizer,
                        self.ms.scheduler, state,
                        keep_last=self.cfg.train.keep_checkpoints, run_id=self.run_id,
                        optimizer_format=self.cfg.train.optimizer_checkpoint,
                        layout=self.layout_sizes,
                        critic=None if self.critic is None else
                        (self.critic.model[0], self.critic.optimizer, self.critic.scheduler),
                        side_files=side_files)

    def export(self, out: Path) -> None:
        """The policy (and critic) as Hugging Face directories under ``out``."""
        export_models(out, self.ms, self.tok, self.critic, self.step)

    def _finish(self) -> None:
        if self.log is not None:
            self.log.note(summarise_run(self.out))

    def close(self, exit_code: int = 1) -> None:
        """Release everything this rank holds: logs, process groups, the engine, the run lock;
        separate placement: the engine ranks told to end with ``exit_code``."""
        self.stop.close()
        if self.feed is not None:
            self.feed.stop(exit_code, started=self.feed_started)
        if self.log is not None:
            self.log.close()
            self.log = None
        destroy_megatron_parallel()
        if self.engine is not None:
            self.engine.shutdown()   # vLLM tears torch.distributed down with it: last
            self.engine = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def train(cfg: RunConfig, quiet: bool = False) -> int:
    """Run a recipe; returns the process exit status (0, ``preempt.EXIT_REQUEUE`` or
    ``preempt.EXIT_NONFINITE``)."""
    roles = None
    if cfg.rollout.placement == "separate":
        roles = _split_roles(cfg)
        if roles.is_engine:
            return run_engine_rank(cfg, roles)
    trainer = Trainer(cfg, quiet=quiet, roles=roles)
    code = 1
    try:
        code = trainer.run()
        return code
    except ServiceDown as e:   # the engine ranks end with its status too
        code = EXIT_UNAVAILABLE
        if trainer.log is not None:
            trainer.log.note(str(e))
        raise
    finally:
        trainer.close(exit_code=code)


def _split_roles(cfg: RunConfig):
    """Separate placement: the world checked, then cut into engine and trainer ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate_world(cfg, world)
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    elif world > 1:
        check_cpu_engines(cfg, world, bool(cfg.model.hf_model().num_experts))
    return init_roles(cfg.rollout.engine_ranks, backend="nccl" if gpu else "gloo")
