"""Rules about whose samples train which policy: what is refused at load (it would train on
nothing, or on routes that do not exist) and what is warned about (it runs, but off-policy
without the correction that keeps its gradient right).
"""

from __future__ import annotations

from typing import List

from megatron_rl.fields import ConfigError


def check_sampling(cfg) -> None:
    """``ConfigError`` for a combination that cannot train correctly (``cfg``: a ``RunConfig``)."""
    a, n = cfg.algo, cfg.rollout.n_samples_per_prompt
    if a.advantage.name == "reinforce_pp" and a.advantage.params.get("baseline") == "group" and n < 2:
        raise ConfigError(
            "algo.advantage.params.baseline: group subtracts the mean reward of each prompt's "
            f"responses, and rollout.n_samples_per_prompt={n} leaves each response alone in its "
            "group: every advantage would be 0; set rollout.n_samples_per_prompt >= 2 or "
            "baseline: none")
    moe = bool(cfg.model.hf_model().num_experts)
    if cfg.train.routing_replay != "off" and not moe:
        raise ConfigError(f"train.routing_replay: {cfg.train.routing_replay} replays expert routes, "
                          "and the model has no experts; set train.routing_replay=off")
    if cfg.rollout.return_routes and not moe:
        raise ConfigError("rollout.return_routes: the model has no experts (no routes to return); "
                          "set it to false")


def check_batching(cfg) -> None:
    """``ConfigError`` for a forward-only token budget the batch layout cannot honour."""
    t = cfg.train
    if not t.logprob_max_tokens_per_micro_batch:
        return
    if not t.pack_sequences:
        raise ConfigError("train.logprob_max_tokens_per_micro_batch: merging micro-batches for "
                          "the log-prob passes needs packed sequences (a padded sequence's CP "
                          "shard depends on its micro-batch); set train.pack_sequences=true or "
                          "train.logprob_max_tokens_per_micro_batch=0")
    if t.logprob_max_tokens_per_micro_batch < t.max_tokens_per_micro_batch:
        raise ConfigError(f"train.logprob_max_tokens_per_micro_batch: "
                          f"{t.logprob_max_tokens_per_micro_batch} is below "
                          f"train.max_tokens_per_micro_batch={t.max_tokens_per_micro_batch}; "
                          "the log-prob passes merge whole training micro-batches, never cut "
                          "them: set it to 0 or at least the training budget")


def check_placement(cfg) -> None:
    """``ConfigError`` for rollout placement settings that do not fit together (world-independent;
    ``config.run.validate_world`` checks the split against the launched world)."""
    r = cfg.rollout
    if r.placement == "colocated":
        for key in ("engine_ranks", "max_staleness"):
            if getattr(r, key):
                raise ConfigError(f"rollout.{key}: {getattr(r, key)} needs "
                                  "rollout.placement=separate (colocated ranks generate and train "
                                  f"in turn); set rollout.placement=separate or rollout.{key}=0")
        return
    if r.engine_ranks < 1:
        raise ConfigError("rollout.engine_ranks: placement=separate needs at least one engine rank "
                          f"(a multiple of rollout.tensor_parallel_size={r.tensor_parallel_size})")
    if r.engine_ranks % r.tensor_parallel_size:
        raise ConfigError(f"rollout.engine_ranks: {r.engine_ranks} is not a multiple of "
                          f"rollout.tensor_parallel_size={r.tensor_parallel_size} (each engine "
                          "takes that many ranks)")
    if r.probe_every > 0:   # it needs the engine and the trainer in one process
        raise ConfigError("rollout.probe_every: with rollout.placement=separate it compares the "
                          "engine with the trainer's forward in one process; set "
                          "rollout.probe_every=0")


def load_warnings(cfg) -> List[str]:
    """One line per setting that trains off-policy without its correction, naming the key that
    fixes it (the run still starts)."""
    a, t = cfg.algo, cfg.train
    out: List[str] = []
    k = cfg.rollout.max_staleness
    if k and not a.mismatch.loss_params():
        out.append(f"rollout.max_staleness={k} samples each step's rollouts with a policy {k} "
                   "update(s) older than the one the old-policy pass measures, and nothing "
                   "corrects for it; set algo.mismatch.tis_cap (e.g. 2.0, with tis_level=sequence "
                   "for GSPO): the decoupled objective")
    off_policy = t.updates_per_step > 1 or t.epochs_per_step > 1
    if not off_policy:
        return out
    why = (f"train.updates_per_step={t.updates_per_step} x train.epochs_per_step="
           f"{t.epochs_per_step} makes every update after the first off-policy")
    p = a.loss.params
    if float(p.get("kl_coef", 0.0) or 0.0) and p.get("kl_placement", "loss") == "loss":
        out.append(f"{why}, and algo.loss.params.kl_placement=loss leaves the KL term outside the "
                   "importance weight (its gradient is then not KL(pi||pi_ref)'s); set "
                   "algo.loss.params.kl_placement=surrogate")
    if a.loss.name == "reinforce" and p.get("weight", "none") == "none":
        out.append(f"{why}, and algo.loss.params.weight=none ignores the importance ratio; set "
                   "algo.loss.params.weight=ppo_clip (or full / upper_clip)")
    if cfg.train.routing_replay == "off" and cfg.model.hf_model().num_experts:
        out.append(f"{why}, and an MoE router may send a token to other experts once the weights "
                   "move, so the ratio would compare two computations; set "
                   "train.routing_replay=rollout (the engine's routes) or old")
    return out
