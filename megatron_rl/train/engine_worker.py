"""An engine rank under separate placement (``rollout.placement: separate``): vLLM only, no
Megatron. It generates step after step, each step ``t`` with the weights of version
``t - 1 - rollout.max_staleness`` (never newer, never older: a fixed lag keeps a run the same on a
rerun), and hands each step's rollouts to trainer rank 0.

The protocol with the trainer (``train.async_feed`` is the other side):
1. ``START`` over the ``batches`` bridge: the engine's model directory and dtype, the first step to
   generate, the prompt sampler's state, the version the trainer streams first.
2. Versions over the ``weights`` bridge, received by a thread into a queue (so that the trainer's
   send never waits for a generation to end), applied between steps, and only the newest one the
   next step may use.
3. One message per step over ``batches``: the step's ``Rollouts``, the sampler state after its
   prompts were drawn, the version that generated it, and the engine's idle seconds.
4. The stop message, with the trainer's exit status, which the engine ranks end with. A step
   whose reward service was down (``Rollouts.fatal``) is the last one generated: the trainer
   stops on it with 69.

Validation (``train.val_every``) runs here, on the engines: right after version ``v`` is applied
(``v`` a multiple of ``val_every``), its ``val/*`` go out with the next step's rollouts (step
``v + 1 + k``). A version no later step is sampled by (``v + 1 + k > train.steps``) is streamed
only for its validation, after the last step was generated; its ``val/*`` go back on their own.
"""

from __future__ import annotations

import queue
import threading
import time

import torch.distributed as dist

from megatron_rl.parallel import roles as R, weight_stream as W
from megatron_rl.rollout.engine import RolloutEngine
from megatron_rl.rollout.scoring import Scorer
from megatron_rl.rollout.weight_sync import sync_weights
from megatron_rl.runtime.crash_points import reached
from megatron_rl.train import setup as S
from megatron_rl.train.producer import RolloutProducer
from megatron_rl.train.validation import Validation

STOP_ONLY = 2**62   # a version ``WeightInbox.upto`` never reaches: it returns the stop message


class WeightInbox:
    """Receives every version the trainer streams, on a thread, in order; ``upto(v)`` skips the
    versions older than ``v`` unapplied and returns the first one at or past ``v`` (the trainer
    streams each version once, in order, so that is ``v`` itself) or the stop message."""

    def __init__(self, group):
        self.q: "queue.Queue[W.Received]" = queue.Queue()
        self.thread = threading.Thread(target=self._run, args=(group,), daemon=True,
                                       name="weight-inbox")
        self.thread.start()

    def _run(self, group) -> None:
        while True:
            got = W.recv_version(group)
            self.q.put(got)
            if got.version == W.STOP:
                return

    def upto(self, version: int) -> W.Received:
        """The version ``version`` (blocking until it is here), or the stop message."""
        while True:
            got = self.q.get()
            if got.version == W.STOP or got.version >= version:
                return got


class EngineWorker:
    """One engine rank: the producer's engine fed by the weight inbox; ``run`` returns the
    trainer's exit status."""

    def __init__(self, cfg, roles: R.Roles):
        self.cfg, self.roles = cfg, roles
        self.hf = cfg.model.hf_model()
        self.tok = S.load_tokenizer(cfg, self.hf)
        self.prompts = S.prompt_stream(cfg, self.tok, S.load_rows(cfg, []))
        episodes = S.episode_runner(cfg, self.tok, self.hf, roles.rank, roles.size)
        self.producer = RolloutProducer(cfg, self.tok, self.prompts, Scorer.of(cfg.reward, self.tok),
                                        episodes, roles.rank, roles.size)
        self.val = None
        if cfg.train.val_every:
            self.val = Validation.of(cfg, self.tok, S.load_rows(cfg, [], validation=True))

    def _validate(self, version: int) -> dict:
        """``val/*`` of the version just applied, if validation is due at it (else empty); the
        same prompts and seeds as the colocated run's validation after step ``version``."""
        every = self.cfg.train.val_every
        if self.val is None or version <= 0 or version % every:
            return {}
        sample = lambda drawn, plan, round_: self.producer.sample(drawn, plan, round_, version)  # noqa: E731
        return {**self.val.run(sample, version), "val/version": float(version)}

    def _start_message(self) -> dict:
        got = [R.recv_object(self.roles.batches, src=1) if self.roles.leads else None]
        dist.broadcast_object_list(got, src=0)   # over the engine ranks' own group
        return got[0]

    def run(self) -> int:
        """Generate until the trainer's stop; returns its exit status."""
        start = self._start_message()
        if start.get("stop") is not None:   # the trainer stopped before its first step
            return int(start["stop"])
        if start["sampler"] is not None:
            self.prompts.sampler.load_state_dict(start["sampler"])
        inbox = WeightInbox(self.roles.weights)
        r = self.cfg.rollout
        n_engines = self.roles.size // r.tensor_parallel_size
        # expert routes (R3) stay in the samples: they travel with the rollouts to the trainers
        engine = RolloutEngine(r.engine_settings(start["model_dir"], dtype=start["dtype"],
                                                 data_parallel_size=n_engines, sleep_mode=False,
                                                 routes=S.route_spec(self.cfg, self.hf)))
        self.producer.engine = engine
        bucket = int(r.sync_bucket_mb * 2**20)
        applied, idle, val = None, 0.0, {}
        try:
            for step in range(start["first_step"], self.cfg.train.steps + 1):
                need = max(start["version"], step - 1 - r.max_staleness)
                if applied != need:
                    t0 = time.perf_counter()
                    got = inbox.upto(need)
                    idle += time.perf_counter() - t0
                    if got.version == W.STOP:
                        return got.exit_code
                    if got.version != need:
                        raise RuntimeError(f"separate placement: step {step} needs policy version "
                                           f"{need}, the trainer sent {got.version}")
                    sync_weights(engine, iter(got.tensors), bucket)
                    applied = got.version
                    val = self._validate(applied)
                reached("generate", step)
                t0 = time.perf_counter()
                rollouts = self.producer.collect(step)
                gen_s = time.perf_counter() - t0
                if self.roles.leads:
                    t0 = time.perf_counter()
                    R.send_object(self.roles.batches, {
                        "step": step, "rollouts": rollouts, "version": applied, "val": val,
                        "sampler": self.prompts.sampler.state_dict(), "engine_idle_s": idle,
                        "generate_s": gen_s}, dst=1)
                    idle = time.perf_counter() - t0   # waiting for the trainer to take it
                val = {}
                if rollouts.fatal:   # the reward service is down: the trainer stops on it
                    return inbox.upto(STOP_ONLY).exit_code
            return self._validate_late(engine, inbox, applied, bucket)
        finally:
            engine.shutdown()

    def _validate_late(self, engine, inbox: WeightInbox, applied, bucket: int) -> int:
        """After the last step: the versions streamed for validation only, each applied and
        validated, its ``val/*`` sent back alone, until the trainer's stop (its exit status)."""
        while True:
            got = inbox.upto(-1 if applied is None else applied + 1)
            if got.version == W.STOP:
                return got.exit_code
            sync_weights(engine, iter(got.tensors), bucket)
            applied = got.version
            val = self._validate(applied)
            if self.roles.leads:
                R.send_object(self.roles.batches, {"step": None, "val_of": applied, "val": val},
                              dst=1)


def run_engine_rank(cfg, roles: R.Roles) -> int:
    """The whole life of an engine rank; returns the exit status the trainer ended with."""
    return EngineWorker(cfg, roles).run()

