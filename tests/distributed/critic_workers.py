"""The critic (``GPTModel`` trunk + ``ValueHead``) through Megatron's schedule under TP / PP / EP /
CP / DP: its value loss and gradients against one process's plain autograd, as
``model_workers.model_equivalence`` does for the policy (the reference weights are saved as a
distributed checkpoint, each layout loads them, and its gradients are saved and un-sharded back)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_rl.model.build import ModelOptions
from megatron_rl.model.hf_config import load_hf_config
from megatron_rl.model.tiny import tiny_hf_config
from megatron_rl.parallel.config import Layout
from megatron_rl.parallel.groups import ParallelGroups
from megatron_rl.parallel.loss import step_denominators
from megatron_rl.runtime.model_setup import build_model, unwrap
from megatron_rl.runtime.parallel_init import destroy_megatron_parallel, init_megatron_parallel
from megatron_rl.train.value_train import ValueLossSpec, _value_loss_func, value_forward_backward
from tests.distributed.model_workers import (NSEQ, S, _built_micro_batches, _finish_layout, _load,
                                             _micro_batches, _save, _sequences)

CLIP = 0.05
INIT_STD = 0.05   # a random head, so that the trunk gets a gradient too (the default is 0)


def _data(vocab: int):
    data = _sequences(vocab)
    g = torch.Generator().manual_seed(5)
    data["old"] = 0.05 * torch.randn(NSEQ, S, generator=g)        # rollout-time values
    returns = torch.randn(NSEQ, S, generator=g)
    return data, returns


def _reference(hf, data, returns, seed):
    init_megatron_parallel(Layout(), seed)
    [model], _ = build_model(hf, Layout(), ModelOptions(), ddp=False, value_head=True,
                             value_head_init_std=INIT_STD)
    [mb] = _micro_batches(data, returns, [list(range(NSEQ))], None)
    nt, ns = step_denominators([mb.shard], None)
    out = model(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=None)
    loss, logged = _value_loss_func(mb, (mb.old_logprobs, mb.advantages),
                                    ValueLossSpec(nt, ns, clip=CLIP), 1.0, out)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return model, float(loss), grads, float(logged["value_clip_frac"])


def _run_layout(hf, layout, n_mb, data, returns, seed, weights, out_dir):
    groups: ParallelGroups = init_megatron_parallel(layout, seed)
    [model], _ = build_model(hf, layout, ModelOptions(), value_head=True)
    _load(unwrap(model), weights)
    mine = [b for b in range(NSEQ) if b % groups.dp_size == groups.dp_rank]
    mbs = _built_micro_batches(data, returns, [mine[i::n_mb] for i in range(n_mb)], groups,
                               packed=False)
    nt, ns = step_denominators([m.shard for m in mbs], groups.dp_cp)
    logged = value_forward_backward([model], mbs, [(m.old_logprobs, m.advantages) for m in mbs],
                                    ValueLossSpec(nt, ns, clip=CLIP), groups)
    return _finish_layout(model, groups, [float(x["value_loss"]) for x in logged], out_dir)


def critic_equivalence(rank: int, world: int, tmp: str, cases) -> dict:
    """``cases``: (name, layout kwargs, micro-batches per rank)."""
    hf = load_hf_config(tiny_hf_config("qwen3_moe"))
    data, returns = _data(hf.vocab_size)
    seed, weights = 99, os.path.join(tmp, "weights")
    ref_model, ref_loss, ref_grads, clip_frac = _reference(hf, data, returns, seed)
    _save(ref_model, weights)
    destroy_megatron_parallel()
    results = {}
    for name, kw, n_mb in cases:
        out = os.path.join(tmp, f"grads_{name}")
        loss = _run_layout(hf, Layout(**kw), n_mb, data, returns, seed, weights, out)
        dist.all_reduce(loss)
        init_megatron_parallel(Layout(), seed)
        [model], _ = build_model(hf, Layout(), ModelOptions(), ddp=False, value_head=True)
        _load(model, out)
        errs = {n: float((p.detach() - ref_grads[n]).abs().max()
                         / ref_grads[n].abs().max().clamp_min(1e-30))
                for n, p in model.named_parameters()}
        destroy_megatron_parallel()
        worst = max(errs, key=errs.get)
        results[name] = {"loss": abs(float(loss[0]) - ref_loss) / abs(ref_loss), "grad": errs[worst],
                         "worst_param": worst, "clip_frac": clip_frac,
                         "trunk_grad": max(float(g.abs().max()) for n, g in ref_grads.items()
                                           if "output_layer" not in n)}
    return results


def critic_export(rank: int, world: int, tmp: str) -> dict:
    """The critic at TP 2 exported as the architecture's token classifier: transformers loads it
    and gives the values Megatron computes, token by token."""
    from megatron_rl.checkpoint.convert import write_hf_model
    from megatron_rl.checkpoint.hf_mapping import mapping_for, value_model_config, value_model_mapping
    from megatron_rl.runtime.parallel_init import weight_groups

    raw = tiny_hf_config("qwen3_moe")
    hf = load_hf_config(raw)
    init_megatron_parallel(Layout(tp=2), 5)
    [model], _ = build_model(hf, Layout(tp=2), ModelOptions(), ddp=False, value_head=True,
                             value_head_init_std=INIT_STD)
    with torch.no_grad():
        model.output_layer.bias.fill_(0.25)     # a bias that must arrive as score.bias
    tokens = _sequences(hf.vocab_size)["tokens"]
    with torch.no_grad():
        ours = model(input_ids=tokens, position_ids=torch.arange(tokens.shape[1]).expand_as(tokens),
                     attention_mask=None).squeeze(-1)
    out = os.path.join(tmp, "hf_critic")
    write_hf_model(model, hf, value_model_mapping(mapping_for(hf)), weight_groups(),
                   value_model_config(raw), out, torch.float32)
    destroy_megatron_parallel()
    result = {}
    if rank == 0:
        from transformers import AutoModelForTokenClassification

        hf_model = AutoModelForTokenClassification.from_pretrained(out).eval()
        with torch.no_grad():
            theirs = hf_model(input_ids=tokens).logits.squeeze(-1)
        result = {"architecture": type(hf_model).__name__, "num_labels": hf_model.config.num_labels,
                  "max_diff": float((theirs - ours).abs().max()),
                  "scale": float(ours.abs().max())}
    dist.barrier()
    return result
