"""A pure-PyTorch toy policy and task that drive the algorithm library end to end on a laptop.

The task: a prompt of ``prompt_len`` digits; the policy answers one token at a time and earns
reward = fraction of the first ``prompt_len`` answer tokens equal to the prompt reversed. Token 0
is EOS: stopping early forfeits the remaining positions. A random policy scores about
1/(vocab_size-1); a learned one scores 1. The policy reads (whole prompt, answer position,
previous token) that is linear per answer position, so it can represent the task
exactly and learns in seconds on a CPU.

Legend: ``N`` responses, ``L`` prompt length, ``T`` max response length, ``V`` vocab size.
This module stands in for the Megatron-Core MoE policy and vLLM until they are wired in; the RL
math it calls (advantages, ratios, weights, losses, DAPO) is the product's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

from megatron_rl.fields import field_

Tensor = torch.Tensor
EOS = 0


@dataclass
class ToyConfig:
    """The ``toy`` section: the task and the policy network of ``model.kind=toy``."""

    vocab_size: int = field_(8, ge=3, help="token 0 is EOS; digits are 1..vocab_size-1")
    prompt_len: int = field_(4, ge=1)


def sample_prompts(n: int, cfg: ToyConfig, gen: torch.Generator) -> Tensor:
    """``[n, L]`` random digits in ``1..V-1``."""
    return torch.randint(1, cfg.vocab_size, (n, cfg.prompt_len), generator=gen)


def reward(prompts: Tensor, responses: Tensor, mask: Tensor) -> Tensor:
    """``[N]`` fraction of answer positions ``j < L`` holding ``prompt[L-1-j]`` (before EOS)."""
    L = prompts.shape[1]
    answer = responses[:, :L]
    valid = mask[:, :L] > 0
    target = prompts.flip(-1)[:, : answer.shape[1]]
    return ((answer == target) & valid).sum(-1).to(torch.float32) / L


class ToyPolicy(nn.Module):
    """``logits[n,j] = onehot(prompt_n) @ W_j + U[previous token] + b_j``: a linear readout of the
    prompt per answer position (reversal is one permutation matrix per position)."""

    def __init__(self, cfg: ToyConfig, max_len: int):
        super().__init__()
        self.V = cfg.vocab_size
        self.readout = nn.Parameter(torch.zeros(max_len, cfg.prompt_len * cfg.vocab_size, cfg.vocab_size))
        self.prev = nn.Embedding(cfg.vocab_size + 1, cfg.vocab_size)
        self.bias = nn.Parameter(torch.zeros(max_len, cfg.vocab_size))
        nn.init.normal_(self.readout, std=0.1)
        nn.init.normal_(self.prev.weight, std=0.1)

    def forward(self, prompts: Tensor, responses: Tensor) -> Tensor:
        """Teacher-forced logits ``[N,T',V]`` for the first ``T'`` response positions (the
        previous token at position 0 is BOS, id ``V``)."""
        N, T = responses.shape
        bos = torch.full((N, 1), self.V, dtype=responses.dtype)
        prev = torch.cat([bos, responses[:, :-1]], dim=1)
        x = nn.functional.one_hot(prompts, self.V).flatten(1).to(self.readout.dtype)
        return torch.einsum("nf,tfv->ntv", x, self.readout[:T]) + self.prev(prev) + self.bias[:T]


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float) -> Tuple[Tensor, Tensor]:
    """Log-prob of ``tokens`` and entropy ``[N,T]`` under ``softmax(logits / temperature)``."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    lp = logp.gather(-1, tokens[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return lp, entropy


def _top_p_filter(logp: Tensor, top_p: float) -> Tensor:
    """Log-probs renormalised over the smallest set of tokens with mass >= ``top_p``."""
    if top_p >= 1.0:
        return logp
    sorted_lp, order = logp.sort(dim=-1, descending=True)
    before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()  # mass strictly before each token
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)


@torch.no_grad()
def generate(policy: ToyPolicy, prompts: Tensor, max_len: int, *, temperature: float, top_p: float,
             gen: torch.Generator) -> Tuple[Tensor, Tensor, Tensor]:
    """Sample responses; returns ``tokens[N,T]``, ``mask[N,T]`` (through EOS) and the sampler's
    log-probs ``[N,T]`` (what a rollout engine reports; they differ from the trainer's when
    ``top_p < 1``)."""
    N = prompts.shape[0]
    tokens = torch.zeros(N, max_len, dtype=torch.long)
    mask = torch.zeros(N, max_len)
    behaviour = torch.zeros(N, max_len)
    alive = torch.ones(N, dtype=torch.bool)
    for j in range(max_len):
        logits = policy(prompts, tokens[:, : j + 1])[:, j]
        logp = _top_p_filter(torch.log_softmax(logits.float() / temperature, -1), top_p)
        tok = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(-1)
        tokens[:, j] = torch.where(alive, tok, torch.zeros_like(tok))
        mask[:, j] = alive.float()
        behaviour[:, j] = torch.where(alive, logp.gather(-1, tok[:, None]).squeeze(-1), 0.0)
        alive = alive & (tok != EOS)
    return tokens, mask, behaviour
