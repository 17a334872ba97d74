"""The learned reward model (``reward.model``) on the trainer ranks: a Hugging Face
``*ForSequenceClassification`` built as megatron-core's ``GPTModel`` trunk with a bias-free
scalar head (``model.value_head``), in the policy's TP / PP / CP / EP / DP layout, forward only.

Legend: ``N`` sequences scored, ``D`` data-parallel ranks, ``[B, 2C]`` the loss view
(``parallel.loss``) in label coordinates.

Scoring (``score_ids``) is collective over every trainer rank. Every rank holds every sequence
(the rollouts reach all of them), so every rank computes the same plan with no communication:
the ``N`` sequences (padded with one-token dummies to a multiple of ``D``) are balanced over the
DP ranks by tokens and packed into micro-batches under ``micro_batch_tokens``
(``train.batch_plan``, each sequence its own group). Megatron's forward-only schedule gives the
last stage the per-token scores as ``[B, 2C]`` views; a one-hot at the sequence's last position,
laid out by the same batch builder, picks its score (only the CP rank holding that position has a
non-zero product). One all-reduce over the world then gives every rank every score: each score
is non-zero on exactly one rank (the last stage, TP rank 0, its DP rank, the CP rank holding the
position), so the sum is exact.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_rl.checkpoint.hf_io import HFReader
from megatron_rl.checkpoint.hf_mapping import mapping_for, reward_model_mapping, trunk_config
from megatron_rl.checkpoint.hf_weights import load_hf_weights
from megatron_rl.fields import ConfigError
from megatron_rl.model.build import ModelOptions
from megatron_rl.model.cpu_modes import cpu_modes_resumed
from megatron_rl.model.hf_config import HFModel, load_hf_config, read_config_json
from megatron_rl.parallel.collectives import all_reduce_nograd
from megatron_rl.parallel.config import Layout
from megatron_rl.parallel.groups import ParallelGroups
from megatron_rl.rewards.learned import rm_token_ids, RunningMoments, scored_length
from megatron_rl.runtime.model_setup import build_model, unwrap
from megatron_rl.runtime.parallel_init import compute_device, weight_groups
from megatron_rl.train.batch_plan import micro_batch_cost, plan_step
from megatron_rl.train.batches import build_micro_batch
from megatron_rl.train.value_train import forward_values

Tensor = torch.Tensor


@dataclasses.dataclass
class RewardModel:
    """This rank's shards of the reward model, its tokenizer, and how it batches."""

    model: List
    hf: HFModel
    pg: ParallelGroups
    tokenizer: Any
    pad_token_id: Optional[int]
    micro_batch_tokens: int
    packed: bool = True
    use_chat_template: bool = True
    offload: bool = False
    weight: float = 1.0                          # its term's weight in the reward
    clip: float = 0.0                            # rewards.learned.shape_scores
    moments: Optional[RunningMoments] = None     # normalize: running (checkpointed)

    def token_ids(self, prompt: Any, response: str) -> List[int]:
        """The reward model's tokens of one response, through the score's position
        (``rewards.learned``)."""
        ids = rm_token_ids(self.tokenizer, prompt, response, self.use_chat_template)
        return ids[:scored_length(ids, self.pad_token_id)]

    @property
    def max_length(self) -> int:
        """The longest sequence the reward model takes (its ``max_position_embeddings``)."""
        return self.hf.max_position_embeddings

    @torch.no_grad()
    def score_ids(self, seqs: Sequence[Sequence[int]]) -> Tensor:
        """The score at the last token of each of ``seqs`` (token id lists), ``[N]`` float64 on
        the host, equal on every rank. Collective over the world: every trainer rank calls it
        with the same ``seqs``."""
        n, dp = len(seqs), self.pg.dp_size
        if n == 0:   # every rank sees the same rollouts: all return here together
            return torch.zeros(0, dtype=torch.float64)
        padded = list(seqs) + [[0]] * (-n % dp)   # dummies: each rank runs the same count
        lens = [len(s) for s in padded]
        cost = micro_batch_cost([[x] for x in lens], packed=self.packed, cp_size=self.pg.cp_size,
                                align_groups=False, tp_size=self.pg.tp_size)
        plan = plan_step(list(range(len(padded))), lens, dp, self.micro_batch_tokens, cost)
        mine = plan.ranks[self.pg.dp_rank]
        device = compute_device()
        mbs = [self._micro_batch([padded[i] for i in b], device) for b in mine]
        self._to(device)
        try:
            with cpu_modes_resumed():
                values = forward_values(self.model, mbs, self.pg)
        finally:
            self._to(torch.device("cpu"))
        out = torch.zeros(len(padded), dtype=torch.float64, device=device)
        if values and self.pg.tp_rank == 0:   # the last stage; TP ranks hold equal values
            for b, v, mb in zip(mine, values, mbs):
                out[torch.tensor(b, device=device)] = (v.double() * mb.advantages.double()).sum(-1)
        return all_reduce_nograd(out, dist.group.WORLD)[:n].cpu()

    def _micro_batch(self, seqs: Sequence[Sequence[int]], device):
        """The batch builder's micro-batch of ``seqs``; the one-hot at each sequence's last
        position rides in the ``advantages`` slot, so it is laid out exactly like the scores."""
        built = []
        for s in seqs:
            tokens = torch.tensor(list(s), dtype=torch.long)
            pick = torch.zeros(len(s))
            pick[-1] = 1.0
            built.append({"tokens": tokens, "loss_mask": torch.ones(len(s)), "advantages": pick,
                          "old_logprobs": torch.zeros(len(s))})   # unread: no loss here
        return build_micro_batch(built, torch.arange(len(seqs)), packed=self.packed,
                                 cp_size=self.pg.cp_size, cp_rank=self.pg.cp_rank,
                                 cp_group=self.pg.cp, tp_size=self.pg.tp_size,
                                 tp_rank=self.pg.tp_rank, device=device)

    def _to(self, device: torch.device) -> None:
        """``offload``: the weights to ``device`` (GPU for a scoring, the host after it)."""
        if self.offload and torch.cuda.is_available():
            for chunk in self.model:
                chunk.to(device)
            if device.type == "cpu":
                torch.cuda.empty_cache()


def load_reward_model(path: str, layout: Layout, opt: ModelOptions, pg: ParallelGroups, *,
                      packed: bool = True, micro_batch_tokens: int = 8192,
                      use_chat_template: bool = True, offload: bool = False,
                      prefix: str = "reward.model.path") -> RewardModel:
    """The reward model at ``path`` built in ``layout`` and loaded on every rank (collective).
    ``ConfigError`` naming ``prefix`` for a config, head or weights that do not fit."""
    raw = read_config_json(path)
    try:
        hf = load_hf_config(trunk_config(raw))
    except ValueError as e:
        raise ConfigError(f"{prefix}: {str(e).split(': ', 1)[-1]} ({path}/config.json)") from None
    if not hf.num_experts:   # a dense model under an expert-parallel policy layout
        layout = dataclasses.replace(layout, ep=1)
    reader = HFReader(path)
    _check_head(reader, hf, path, prefix)
    tokenizer = _tokenizer(path, prefix)
    if len(tokenizer) > hf.vocab_size:
        raise ConfigError(f"{prefix}: its tokenizer has {len(tokenizer)} tokens but the model's "
                          f"vocab_size is {hf.vocab_size} ({path}): ids past it have no embedding")
    try:
        [model], _ = build_model(hf, layout, dataclasses.replace(opt, init_weights=False),
                                 ddp=False, value_head=True, head_bias=False)
        load_hf_weights(unwrap(model), reader, reward_model_mapping(mapping_for(hf)),
                        weight_groups(), hf.num_experts)
    except ValueError as e:
        raise ConfigError(f"{prefix}: {e}") from None
    model.eval()
    pad = raw.get("pad_token_id")
    rm = RewardModel([model], hf, pg, tokenizer, None if pad is None else int(pad),
                     micro_batch_tokens, packed, use_chat_template, offload)
    rm._to(torch.device("cpu"))
    return rm


def _check_head(reader: HFReader, hf: HFModel, path: str, prefix: str) -> None:
    """On every rank (only the last stage loads the head): the one-label ``score`` weight, no
    bias (transformers' sequence classifiers have none: one here would be dropped)."""
    hidden = int(hf.config["hidden_size"])
    if "score.weight" not in reader.weight_map:
        raise ConfigError(f"{prefix}: {path} has no score.weight (the reward head "
                          f"[1, {hidden}]); is it a *ForSequenceClassification checkpoint?")
    if reader.shape("score.weight") != [1, hidden]:
        raise ConfigError(f"{prefix}: {path}: score.weight has shape {reader.shape('score.weight')}; "
                          f"a reward model's head is [1, {hidden}] (one label)")
    extra = sorted(n for n in reader.weight_map if n.startswith("score.") and n != "score.weight")
    if extra:
        raise ConfigError(f"{prefix}: {path} holds {', '.join(extra)}, which transformers' "
                          "sequence classifier has no place for; remove it or fold it in")


def _tokenizer(path: str, prefix: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(Path(path)))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{prefix}: cannot load the reward model's tokenizer from {path} "
                          f"({str(e).splitlines()[0][:200]})") from None
