"""The RL loop on the toy policy: rollout -> reward -> old/ref log-probs -> advantages ->
mini-batch updates with global denominators -> metrics. Same algorithm registries, same
normalisers as the Megatron trainer will use; the policy and the sampler are the toy's.
"""

from __future__ import annotations

import copy
import json
import pathlib
import sys
import time
from typing import Dict, List

import torch

from megatron_rl import toy
from megatron_rl.algo.advantages import compute_advantages
from megatron_rl.algo.dapo import dynamic_sampling_keep, overlong_penalty
from megatron_rl.algo.kl import kl_estimate
from megatron_rl.algo.losses import policy_loss
from megatron_rl.config import RunConfig, to_yaml

Tensor = torch.Tensor


def train_toy(cfg: RunConfig, quiet: bool = False) -> List[Dict[str, float]]:
    """Run ``cfg.train.steps`` RL steps; returns the logged metrics per step (also written to
    ``output_dir/metrics.jsonl``, with the resolved config in ``output_dir/config.yaml``)."""
    torch.manual_seed(cfg.train.seed)
    gen = torch.Generator().manual_seed(cfg.rollout.seed)
    T = cfg.rollout.max_response_len
    policy = toy.ToyPolicy(cfg.toy, T)
    reference = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    out = pathlib.Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    history: List[Dict[str, float]] = []
    start = time.perf_counter()
    with open(out / "metrics.jsonl", "w") as log:
        for step in range(1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            metrics = rl_step(cfg, policy, reference, opt, gen)
            metrics["time/step_s"] = time.perf_counter() - t0
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
                history.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                if not quiet:
                    _progress(row, cfg.train.steps, time.perf_counter() - start)
    if not quiet:
        _summary(history, out)
    return history


def rl_step(cfg: RunConfig, policy, reference, opt, gen) -> Dict[str, Tensor]:
    P, G, T = cfg.train.prompts_per_step, cfg.rollout.n_samples_per_prompt, cfg.rollout.max_response_len
    prompts = toy.sample_prompts(P, cfg.toy, gen).repeat_interleave(G, 0)
    group_ids = torch.arange(P).repeat_interleave(G)
    tokens, mask, rollout_lp = toy.generate(policy, prompts, T, temperature=cfg.rollout.temperature,
                                            top_p=cfg.rollout.top_p, gen=gen)
    rewards = toy.reward(prompts, tokens, mask)
    metrics = {"reward/mean": rewards.mean(), "reward/std": rewards.std(),
               "response/length": mask.sum(-1).mean()}
    if cfg.algo.overlong.buffer_len:
        rewards = rewards + overlong_penalty(mask.sum(-1), max_len=T, buffer_len=cfg.algo.overlong.buffer_len,
                                             penalty_factor=cfg.algo.overlong.penalty_factor)
    if cfg.algo.dynamic_sampling:
        keep = dynamic_sampling_keep(rewards, group_ids)
        metrics["dapo/kept_frac"] = keep.float().mean()
        if not keep.any():
            return metrics
        prompts, tokens, mask, rollout_lp, rewards = (x[keep] for x in (prompts, tokens, mask, rollout_lp, rewards))
        group_ids = torch.unique(group_ids[keep], return_inverse=True)[1]
    temp = cfg.rollout.temperature
    with torch.no_grad():
        old_lp, _ = toy.token_logprobs(policy(prompts, tokens), tokens, temp)
        ref_lp, _ = toy.token_logprobs(reference(prompts, tokens), tokens, temp)
    kl = kl_estimate(old_lp, ref_lp, cfg.algo.kl_estimator, mask=mask,
                     clamp_log_ratio=cfg.algo.kl_clamp_log_ratio, clamp_value=cfg.algo.kl_clamp_value)
    adv = compute_advantages(cfg.algo.advantage.name, rewards=rewards, mask=mask, group_ids=group_ids,
                             kl=kl, **cfg.algo.advantage.params)
    metrics["advantage/mean"] = (adv * mask).sum() / mask.sum()
    metrics["advantage/abs_max"] = adv.abs().max()
    batch = dict(prompts=prompts, tokens=tokens, mask=mask, old=old_lp, ref=ref_lp,
                 rollout=rollout_lp, adv=adv)
    train_metrics = _updates(cfg, policy, opt, batch, group_ids)
    return {**metrics, **train_metrics}


def _updates(cfg: RunConfig, policy, opt, batch: Dict[str, Tensor], group_ids: Tensor) -> Dict[str, Tensor]:
    """``epochs_per_step`` passes of ``updates_per_step`` optimizer steps over whole-group
    mini-batches (groups reshuffled each pass), each accumulated over micro-batches whose loss
    uses the mini-batch's token and sequence counts."""
    U = cfg.train.updates_per_step * cfg.train.epochs_per_step
    chunks = [c for _ in range(cfg.train.epochs_per_step)
              for c in torch.randperm(int(group_ids.max()) + 1).chunk(cfg.train.updates_per_step)]
    sums: Dict[str, Tensor] = {}
    for chunk in chunks:
        rows = torch.nonzero(torch.isin(group_ids, chunk)).squeeze(-1)
        num_tokens, num_seqs = batch["mask"][rows].sum(), float(len(rows))
        for micro in rows.split(cfg.train.micro_batch_size):
            mb = {k: v[micro] for k, v in batch.items()}
            lp, ent = toy.token_logprobs(policy(mb["prompts"], mb["tokens"]), mb["tokens"],
                                         cfg.rollout.temperature)
            loss, met = policy_loss(cfg.algo.loss.name, logprobs=lp, old_logprobs=mb["old"],
                                    advantages=mb["adv"], mask=mb["mask"], ref_logprobs=mb["ref"],
                                    rollout_logprobs=mb["rollout"], entropy=ent,
                                    num_tokens=num_tokens, num_seqs=num_seqs, **cfg.algo.loss.params)
            loss.backward()
            for k, v in {"loss": loss.detach(), **met}.items():
                sums[k] = sums.get(k, 0.0) + v / U
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + torch.nn.utils.clip_grad_norm_(
            policy.parameters(), cfg.train.max_grad_norm) / U
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {f"train/{k}": v for k, v in sums.items()}


def _progress(row: Dict[str, float], steps: int, elapsed: float) -> None:
    step = row["step"]
    eta = elapsed / step * (steps - step)
    parts = [f"step {step:>4}/{steps}", f"reward {row['reward/mean']:.3f}",
             f"kl {row.get('train/kl', 0.0):.4f}", f"entropy {row.get('train/entropy', 0.0):.3f}",
             f"clip {row.get('train/clip_frac_low', 0.0) + row.get('train/clip_frac_high', 0.0):.3f}",
             f"len {row['response/length']:.1f}", f"{row['time/step_s'] * 1e3:.0f} ms/step", f"ETA {eta:.0f}s"]
    print(" | ".join(parts), file=sys.stderr, flush=True)


def _summary(history: List[Dict[str, float]], out: pathlib.Path) -> None:
    k = max(1, len(history) // 10)
    first = sum(r["reward/mean"] for r in history[:k]) / k
    last = sum(r["reward/mean"] for r in history[-k:]) / k
    print(f"reward {first:.3f} -> {last:.3f} (mean of first/last {k} logged steps); "
          f"metrics in {out / 'metrics.jsonl'}", flush=True)
