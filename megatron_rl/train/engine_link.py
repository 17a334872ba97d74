"""The trainer's side of its rollout engines: the HF directory they start from, the colocated
engine (started, synced after every update, probed), and the separate engine ranks (started and
streamed to through ``train.async_feed``). A mixin of ``trainer.Trainer``, which holds the state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch.distributed as dist

from megatron_rl.checkpoint.convert import write_hf_model
from megatron_rl.checkpoint.hf_weights import iter_hf_weights
from megatron_rl.data.prompts import render_prompt
from megatron_rl.io_errors import reported_writes
from megatron_rl.model.cpu_modes import cpu_modes_suspended
from megatron_rl.rollout.engine import RolloutEngine
from megatron_rl.rollout.weight_sync import sync_weights
from megatron_rl.runtime.model_setup import unwrap
from megatron_rl.runtime.parallel_init import compute_device
from megatron_rl.train import rl_batch, setup as S


class EngineLink:
    """Engine start-up, weight sync and probe for ``Trainer`` (uses its ``cfg``, ``ms``, ``hf``,
    ``tok``, ``out``, ``rank``, ``step``, ``feed``, ``log``, ``prompts``, ``pg``)."""

    def _engine_dir(self) -> Path:
        """The HF directory the engines start from (the initial weights written there if none)."""
        r = self.cfg.rollout
        hf_dir = S.engine_loadable_hf_dir(self.cfg)
        model_dir = Path(r.model_dir or hf_dir or self.out / "hf_init")
        if not r.model_dir and not hf_dir and not (model_dir / "config.json").is_file():
            # a full disk here is one line and exit 74, as during a checkpoint; the directory is
            # renamed into place whole (tokenizer included) or not at all
            with reported_writes("the engine's initial weights", model_dir,
                                 "nothing was trained and no partial files are left; free space "
                                 "and rerun the same command"):
                write_hf_model(self.ms.model[0], self.hf, self.ms.mapping, self.ms.weight_groups,
                               self.ms.hf_cfg, model_dir, self.ms.dtype,
                               tokenizer=self.tok if self.rank == 0 else None)
            dist.barrier()
        return model_dir

    @property
    def _bucket_bytes(self) -> int:
        return int(self.cfg.rollout.sync_bucket_mb * 2**20)

    @cpu_modes_suspended()   # the weights gathered to rank 0 (as the colocated sync)
    def _start_engines(self) -> None:
        """Separate placement: the engine ranks told where to start, then sent this version."""
        self.push_metrics = self.feed.start(
            str(self._engine_dir()), str(self.ms.dtype).replace("torch.", ""), self.step,
            self.prompts.sampler.state_dict(), lambda: self._hf_weights(dst=0), self._bucket_bytes)
        self.feed_started = True

    @cpu_modes_suspended()
    def _push(self) -> None:
        """Separate placement: this step's version to the engine ranks, if a later step uses it;
        its metrics go out with the next step."""
        if self.feed.due(self.step):
            self.push_metrics = self.feed.push(self.step, lambda: self._hf_weights(dst=0),
                                               self._bucket_bytes)

    def _validation(self) -> Dict[str, float]:
        """This step's ``val/*``. Colocated: run now, on the engine just synced. Separate: those
        the engines sent with this step's rollouts (``val/version`` says which version), and, when
        validation is due at a version no later step is sampled by, that version's (streamed for
        it and awaited); were both to land in one row, the older is logged in a row of its own."""
        due = self.val is not None and self.step % self.cfg.train.val_every == 0
        if self.feed is None:
            return self.val.run(self._sample, self.step) if due else {}
        got, self.feed.val = self.feed.val, {}
        if due and not self.feed.due(self.step):
            if got and self.log is not None:
                self.log.log(int(got["val/version"]), got)
            got = self._validate_alone()
        return got

    @cpu_modes_suspended()   # the weights gathered to rank 0 (as the colocated sync)
    def _validate_alone(self) -> Dict[str, float]:
        return self.feed.validate(self.step, lambda: self._hf_weights(dst=0), self._bucket_bytes)

    def _engine(self):
        r = self.cfg.rollout
        hf_dir = S.engine_loadable_hf_dir(self.cfg)
        model_dir = self._engine_dir()
        engine = RolloutEngine(r.engine_settings(
            str(model_dir), dtype=str(self.ms.dtype).replace("torch.", ""),
            data_parallel_size=self.n_engines, routes=self.route_spec))
        # the engine's files are not the trainer's weights: sync them in before the first step
        if self.step > 0 or r.model_dir or (hf_dir and self.weights_from != str(hf_dir)):
            self._sync(engine)
        return engine

    def _hf_weights(self, dst=None):
        return iter_hf_weights(unwrap(self.ms.model[0]), self.ms.mapping, self.ms.weight_groups,
                               self.hf.num_experts, dst=dst)

    @cpu_modes_suspended()
    def _sync(self, engine):
        return sync_weights(engine, self._hf_weights(), self._bucket_bytes)

    def _probe_due(self) -> bool:
        every = self.cfg.rollout.probe_every
        return bool(every) and (self.step % every == 0 or self.step == 1)

    def _probe(self) -> float:
        """Max |engine - trainer| log-prob on a fixed prompt's sampled tokens, just after sync."""
        r = self.cfg.rollout
        ids = render_prompt(self.prompts.rows[0], self.tok, chat=self.cfg.data.chat_template,
                            max_tokens=r.max_prompt_len)
        worst = rl_batch.probe_mismatch(self.engine, self.ms.model, self.pg, ids,
                                        max_tokens=min(16, r.max_response_len),
                                        temperature=r.temperature,
                                        cp_size=self.cfg.parallel.context_parallel_size,
                                        cp_rank=self._cp_rank(), device=compute_device())
        if worst > r.probe_tolerance and self.log is not None:
            self.log.note(f"step {self.step}: engine and trainer log-probs differ by {worst:.2e} "
                          f"after the weight sync (rollout.probe_tolerance {r.probe_tolerance:g})")
        return worst
