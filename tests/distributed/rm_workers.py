"""The learned reward model (``train.reward_model``) under each parallel layout against
transformers' ``*ForSequenceClassification`` on the same directory, one sequence at a time."""

from __future__ import annotations

import os
import random

import torch
import torch.distributed as dist

from megatron_rl.model.build import ModelOptions
from megatron_rl.model.tiny import write_tiny_hf_model
from megatron_rl.parallel.config import Layout
from megatron_rl.rewards.tiny_rm import rm_tokenizer
from megatron_rl.runtime.parallel_init import destroy_megatron_parallel, init_megatron_parallel
from megatron_rl.train.reward_model import load_reward_model

PAD = 3   # the reward models' pad_token_id: a trailing run of it is not read (transformers' rule)


def _sequences(vocab: int, n: int = 7, seed: int = 0):
    """Uneven lengths (3 to 40), one ending in padding and one holding it in the middle."""
    rng = random.Random(seed)
    seqs = [[rng.randrange(4, vocab) for _ in range(rng.randint(3, 40))] for _ in range(n)]
    seqs[1] += [PAD, PAD]
    seqs[2][1] = PAD
    return seqs


def write_models(tmp: str) -> dict:
    """A dense (Qwen3) and an MoE (Qwen3-MoE) tiny reward model, random weights."""
    out = {}
    for name in ("qwen3", "qwen3_moe"):
        d = os.path.join(tmp, f"rm_{name}")
        write_tiny_hf_model(name, d, seed=3, reward_model=True, pad_token_id=PAD)
        rm_tokenizer().save_pretrained(d)
        out[name] = d
    return out


def transformers_scores(path: str, seqs) -> list:
    """transformers' scores, one unpadded sequence per call."""
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [float(m(input_ids=torch.tensor([s])).logits[0, 0]) for s in seqs]


def rm_equivalence(rank: int, world: int, tmp: str, cases) -> dict:
    """``cases``: (name, layout kwargs, micro_batch_tokens, packed). Rank 0 wrote the models
    (``write_models``) and transformers' scores before the spawn; each layout's scores on every
    rank are compared with them."""
    import json

    with open(os.path.join(tmp, "reference.json")) as f:
        ref = json.load(f)
    results = {}
    for name, kw, budget, packed in cases:
        for arch in ("qwen3", "qwen3_moe"):
            pg = init_megatron_parallel(Layout(**kw), 0)
            rm = load_reward_model(ref["paths"][arch], Layout(**kw), ModelOptions(), pg,
                                   packed=packed, micro_batch_tokens=budget)
            cut = [s[:_read(s)] for s in ref["seqs"]]
            got = rm.score_ids(cut)
            empty = rm.score_ids([]).numel() == 0
            want = torch.tensor(ref["scores"][arch], dtype=torch.float64)
            everywhere = [None] * world
            dist.all_gather_object(everywhere, got.tolist())
            destroy_megatron_parallel()
            results[f"{name}/{arch}"] = {
                "max_diff": float((got - want).abs().max()),
                "scale": float(want.abs().max()),
                "ranks_agree": all(e == everywhere[0] for e in everywhere), "empty": empty}
    return results


def _read(s) -> int:
    from megatron_rl.rewards.learned import scored_length

    return scored_length(s, PAD)
