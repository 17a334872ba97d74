"""PPO's critic beside the policy: its own Megatron model (the policy's trunk with a scalar value
head, ``model.value_head``), optimizer and learning-rate schedule, in the policy's layout.

Legend: ``[B, 2C]`` the sharded loss view (``parallel.loss``), in label coordinates.

A step: ``values`` (forward only, with the old log-probs) gives the rollout-time values ``V_old``;
GAE turns them into advantages and returns ``G = A + V_old`` (``rl_batch.set_advantages``);
``update`` then follows each policy update on the same micro-batches with the clipped value loss
over that update's global token and sequence counts, exactly as the policy's loss is normalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from megatron_rl.algo.value import ev_moments
from megatron_rl.checkpoint.dist_ckpt import CRITIC_MARKER, load_model
from megatron_rl.parallel.groups import ParallelGroups
from megatron_rl.parallel.loss import step_denominators
from megatron_rl.runtime.model_setup import unwrap
from megatron_rl.train.optimizer import nonfinite_flag, optimizer_step
from megatron_rl.train.step_metrics import EV_KEYS
from megatron_rl.train.value_train import ValueLossSpec, forward_values, value_forward_backward

Tensor = torch.Tensor



@dataclass
class Critic:
    """PPO's value model beside the policy: its model, optimizer and scheduler, values and updates."""
    model: List
    optimizer: object
    scheduler: object
    pg: ParallelGroups
    clip: Optional[float] = 0.5
    agg: str = "token-mean"

    def values(self, micro_batches) -> List[Tensor]:
        """``V_old`` ``[B, 2C]`` per micro-batch (last pipeline stage; others get [])."""
        return forward_values(self.model, micro_batches, self.pg)

    def update(self, batch, idx: Sequence[int]) -> Dict[str, Tensor]:
        """One critic update on micro-batches ``idx``: this rank's partial metric sums."""
        mbs = [batch.micro_batches[i] for i in idx]
        num_tokens, num_seqs = step_denominators([m.shard for m in mbs], self.pg.dp_cp)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        targets = [(None, None) if batch.values is None else (batch.values[i], batch.returns[i])
                   for i in idx]
        spec = ValueLossSpec(num_tokens, num_seqs, clip=self.clip, agg=self.agg)
        logged = value_forward_backward(self.model, mbs, targets, spec, self.pg)
        bad = nonfinite_flag(self.model, [row["value_loss"] for row in logged])
        applied, grad_norm, _ = optimizer_step(self.optimizer, self.scheduler, bad,
                                               torch.distributed.group.WORLD)
        out: Dict[str, Tensor] = {}
        for row in logged:
            for k, v in row.items():
                if k != "ev_moments":   # explained variance is that of the rollout's values
                    out[f"critic/{k}"] = out.get(f"critic/{k}", 0.0) + v.float()
        out["critic/grad_norm"] = torch.tensor(float(grad_norm or 0.0))
        out["critic/skipped_updates"] = torch.tensor(float(not applied))
        return out

    def lr(self) -> float:
        """The critic's current learning rate."""
        return float(self.optimizer.param_groups[0]["lr"])


def explained_variance_sums(batch) -> Dict[str, Tensor]:
    """The additive pieces of the explained variance of the rollout's values against the returns
    (``algo.value.ev_moments``), as partial sums named ``EV_KEYS``; the trainer turns the reduced
    sums into ``critic/explained_variance``."""
    if not batch.values:
        return {}
    total = sum(ev_moments(v, g, mb.shard.mask)
                for v, g, mb in zip(batch.values, batch.returns, batch.micro_batches))
    return dict(zip(EV_KEYS, total.unbind()))


def copy_trunk(policy: List, critic: List) -> int:
    """The policy's weights into the critic's parameters of the same name (every one but the value
    head); the layouts are the same, so each rank copies its own shards. Returns how many."""
    src = dict(unwrap(policy[0]).named_parameters())
    n = 0
    with torch.no_grad():
        for name, p in unwrap(critic[0]).named_parameters():
            if name.startswith("output_layer."):
                continue
            if name not in src or src[name].shape != p.shape:
                raise ValueError(f"critic parameter {name} has no counterpart of shape "
                                 f"{tuple(p.shape)} in the policy")
            p.copy_(src[name])
            n += 1
    return n


def load_critic_init(path: str, critic: List) -> str:
    """``critic.init_from``: a checkpoint's ``critic`` directory (trunk and head), or any policy
    checkpoint (its trunk; the head keeps its initialisation). Collective."""
    p = Path(path)
    with_head = (p / CRITIC_MARKER).is_file()
    load_model(p, critic[0], skip=() if with_head else ("output_layer.",))
    return f"{p} ({'trunk and head' if with_head else 'trunk; fresh head'})"
