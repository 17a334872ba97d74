"""Names and shapes between Hugging Face checkpoints and megatron-core ``GPTModel`` tensors.

A ``Rule`` ties one megatron tensor (global name: global layer ``{L}``, global expert ``{E}``) to
the HF tensors it is made of, how they are fused, and how megatron shards it over tensor
parallelism. Everything here is pure tensor code on whole (unsharded) tensors and single shards;
``checkpoint/hf_weights.py`` walks a (sharded) model with it.

Legend: ``h`` hidden size, ``nh`` query heads, ``ng`` KV groups, ``d`` head dim, ``F`` FFN size.

Fusions:
- ``qkv``: megatron's ``linear_qkv`` is grouped by KV group, ``[ng, (nh/ng + 2) * d, h]``: each
  group's query heads, then its key head, then its value head (bias the same without ``h``).
- ``gate_up``: ``linear_fc1 = cat(gate, up)`` on dim 0 (``[2F, h]``).

TP splits (``split``) of the whole megatron tensor, rank ``r`` of ``n``:
- ``col``: dim 0 in ``n`` contiguous chunks (column-parallel layers, vocab-parallel embedding and
  output layer; for ``qkv`` that is whole KV groups per rank);
- ``row``: dim 1 in chunks (row-parallel ``linear_proj``, ``linear_fc2``);
- ``glu``: gate and up each in chunks, rank ``r`` holds ``cat(gate_r, up_r)``;
- ``None``: replicated (norms, routers, MLA down-projections, which TE duplicates).
Routed experts shard over expert-TP and are distributed over EP (``hf_weights``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_rl.model.hf_config import HFModel

Tensor = torch.Tensor


@dataclass(frozen=True)
class Rule:
    """One megatron-core parameter pattern and the HF tensors it maps to, how they fuse, and how it
    is split over ranks."""
    mcore: str                      # e.g. "decoder.layers.{L}.self_attention.linear_qkv.weight"
    hf: Tuple[str, ...]             # e.g. ("model.layers.{L}.self_attn.q_proj.weight", ...)
    fuse: str = "copy"              # copy | qkv | gate_up
    split: Optional[str] = None     # None | col | row | glu
    tied: bool = False              # the output layer read from the tied input embedding
    regex: "re.Pattern" = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        pattern = re.escape(self.mcore).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
        object.__setattr__(self, "regex", re.compile(pattern + "$"))

    def hf_names(self, L: Optional[int] = None, E: Optional[int] = None) -> List[str]:
        """The HF names of this rule for layer ``L`` and expert ``E``."""
        return [n.format(L=L, E=E) for n in self.hf]


# ----------------------------------------------------------------------------- rule sets

def _attention_gqa(hf: HFModel, qk_norm: bool) -> List[Rule]:
    a, m = "decoder.layers.{L}.self_attention.", "model.layers.{L}.self_attn."
    rules = [Rule(a + "linear_qkv.weight", tuple(m + f"{x}_proj.weight" for x in "qkv"), "qkv", "col"),
             Rule(a + "linear_proj.weight", (m + "o_proj.weight",), split="row")]
    if hf.config.get("add_qkv_bias"):
        rules.append(Rule(a + "linear_qkv.bias", tuple(m + f"{x}_proj.bias" for x in "qkv"), "qkv", "col"))
    if hf.proj_bias:  # a row-parallel layer's bias is added once, after the reduction: replicated
        rules.append(Rule(a + "linear_proj.bias", (m + "o_proj.bias",)))
    if qk_norm:
        rules += [Rule(a + "q_layernorm.weight", (m + "q_norm.weight",)),
                  Rule(a + "k_layernorm.weight", (m + "k_norm.weight",))]
    return rules


def _attention_mla(hf: HFModel) -> List[Rule]:
    """Low-rank queries (``q_lora_rank``) or, when it is null (DeepSeek-V2-Lite style), one
    full-rank query projection."""
    a, m = "decoder.layers.{L}.self_attention.", "model.layers.{L}.self_attn."
    q = [Rule(a + "linear_q_down_proj.weight", (m + "q_a_proj.weight",)),
         Rule(a + "q_layernorm.weight", (m + "q_a_layernorm.weight",)),
         Rule(a + "linear_q_up_proj.weight", (m + "q_b_proj.weight",), split="col")]
    if not hf.config.get("q_lora_rank"):
        q = [Rule(a + "linear_q_proj.weight", (m + "q_proj.weight",), split="col")]
    return q + [
            Rule(a + "linear_kv_down_proj.weight", (m + "kv_a_proj_with_mqa.weight",)),
            Rule(a + "kv_layernorm.weight", (m + "kv_a_layernorm.weight",)),
            Rule(a + "linear_kv_up_proj.weight", (m + "kv_b_proj.weight",), split="col"),
            Rule(a + "linear_proj.weight", (m + "o_proj.weight",), split="row")]


def _mlp(mcore_prefix: str, hf_prefix: str, gate: str = "gate_proj", up: str = "up_proj",
         down: str = "down_proj") -> List[Rule]:
    return [Rule(mcore_prefix + "linear_fc1.weight",
                 (f"{hf_prefix}{gate}.weight", f"{hf_prefix}{up}.weight"), "gate_up", "glu"),
            Rule(mcore_prefix + "linear_fc2.weight", (f"{hf_prefix}{down}.weight",), split="row")]


def _experts(hf_prefix: str, gate: str = "gate_proj", up: str = "up_proj",
             down: str = "down_proj") -> List[Rule]:
    """Routed experts, per-expert modules (SequentialMLP) and TE grouped GEMM (``weight{E}``)."""
    e = "decoder.layers.{L}.mlp.experts."
    seq = _mlp(e + "local_experts.{E}.", hf_prefix, gate, up, down)
    grouped = [Rule(r.mcore.replace("local_experts.{E}.", "").replace(".weight", ".weight{E}"),
                    r.hf, r.fuse, r.split) for r in seq]
    return seq + grouped


def _common(hf: HFModel) -> List[Rule]:
    rules = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), split="col"),
             Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
             Rule("decoder.layers.{L}.input_layernorm.weight", ("model.layers.{L}.input_layernorm.weight",)),
             Rule("decoder.layers.{L}.pre_mlp_layernorm.weight",
                  ("model.layers.{L}.post_attention_layernorm.weight",))]
    if hf.tie_word_embeddings:
        rules.append(Rule("output_layer.weight", ("model.embed_tokens.weight",), split="col", tied=True))
    else:
        rules.append(Rule("output_layer.weight", ("lm_head.weight",), split="col"))
    return rules


DENSE_MLP = _mlp("decoder.layers.{L}.mlp.", "model.layers.{L}.mlp.")

RULE_SETS: Dict[str, Callable[[HFModel], List[Rule]]] = {
    "Qwen2ForCausalLM": lambda hf: _attention_gqa(hf, False) + DENSE_MLP,
    "Qwen3ForCausalLM": lambda hf: _attention_gqa(hf, True) + DENSE_MLP,
    "Qwen3MoeForCausalLM": lambda hf: (
        _attention_gqa(hf, True) + DENSE_MLP
        + [Rule("decoder.layers.{L}.mlp.router.weight", ("model.layers.{L}.mlp.gate.weight",))]
        + _experts("model.layers.{L}.mlp.experts.{E}.")),
    "MixtralForCausalLM": lambda hf: (
        _attention_gqa(hf, False)
        + [Rule("decoder.layers.{L}.mlp.router.weight", ("model.layers.{L}.block_sparse_moe.gate.weight",))]
        + _experts("model.layers.{L}.block_sparse_moe.experts.{E}.", "w1", "w3", "w2")),
    "DeepseekV3ForCausalLM": lambda hf: (
        _attention_mla(hf) + DENSE_MLP
        + [Rule("decoder.layers.{L}.mlp.router.weight", ("model.layers.{L}.mlp.gate.weight",)),
           Rule("decoder.layers.{L}.mlp.router.expert_bias",
                ("model.layers.{L}.mlp.gate.e_score_correction_bias",))]
        + _mlp("decoder.layers.{L}.mlp.shared_experts.", "model.layers.{L}.mlp.shared_experts.")
        + _experts("model.layers.{L}.mlp.experts.{E}.")),
}

# HF tensors that carry no weights megatron needs (recomputed buffers, DeepSeek's multi-token
# prediction layers beyond num_hidden_layers are handled by the caller)
IGNORED_HF = (re.compile(r".*\.rotary_emb\.inv_freq$"),)


@dataclass(frozen=True)
class Mapping:
    """The rules of one model, and the attention shape the ``qkv`` fusion needs."""

    architecture: str
    rules: Tuple[Rule, ...]
    num_heads: int
    num_groups: int
    head_dim: int

    def match(self, mcore_name: str) -> Tuple[Rule, Dict[str, int]]:
        """The rule that matches ``mcore_name`` and its layer / expert indices; an unmatched name
        fails naming it."""
        for rule in self.rules:
            m = rule.regex.match(mcore_name)
            if m:
                return rule, {k: int(v) for k, v in m.groupdict().items()}
        raise KeyError(f"megatron tensor {mcore_name!r} has no Hugging Face mapping for "
                       f"{self.architecture} (an unsupported model option?)")

    def to_mcore(self, rule: Rule, hf_tensors: Sequence[Tensor]) -> Tensor:
        """The whole megatron tensor from its HF tensors."""
        if rule.fuse == "copy":
            return hf_tensors[0]
        if rule.fuse == "gate_up":
            return torch.cat(list(hf_tensors), 0)
        q, k, v = hf_tensors
        ng, rest = self.num_groups, q.shape[1:]
        return torch.cat([x.reshape(ng, -1, *rest) for x in (q, k, v)], 1).reshape(-1, *rest)

    def to_hf(self, rule: Rule, whole: Tensor) -> List[Tensor]:
        """The HF tensors of a whole megatron tensor (views where possible; callers copy)."""
        if rule.fuse == "copy":
            return [whole]
        if rule.fuse == "gate_up":
            return list(whole.chunk(2, 0))
        ng, d, rest = self.num_groups, self.head_dim, whole.shape[1:]
        per_group = self.num_heads // ng * d
        g = whole.reshape(ng, per_group + 2 * d, *rest)
        q, k, v = g.split([per_group, d, d], 1)
        return [x.reshape(-1, *rest) for x in (q, k, v)]


def mapping_for(hf: HFModel) -> Mapping:
    """The weight mapping of ``hf``'s architecture; an unsupported one fails listing the supported."""
    if hf.architecture not in RULE_SETS:
        raise ValueError(f"no Hugging Face weight mapping for {hf.architecture!r}; supported: "
                         f"{', '.join(sorted(RULE_SETS))}")
    c = hf.config
    return Mapping(hf.architecture, tuple(_common(hf) + RULE_SETS[hf.architecture](hf)),
                   int(c["num_attention_heads"]), int(c["num_query_groups"]),
                   int(c.get("kv_channels") or 0))  # MLA has no fused QKV


def shard(whole: Tensor, split: Optional[str], rank: int, size: int) -> Tensor:
    """This TP rank's piece of a whole megatron tensor."""
    if split is None or size == 1:
        return whole
    if split == "col":
        return whole.chunk(size, 0)[rank]
    if split == "row":
        return whole.chunk(size, 1)[rank]
    gate, up = whole.chunk(2, 0)
    return torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]], 0)


def unshard(pieces: Sequence[Tensor], split: Optional[str]) -> Tensor:
    """The whole megatron tensor from every TP rank's piece (rank order)."""
    if split is None or len(pieces) == 1:
        return pieces[0]
    if split == "col":
        return torch.cat(list(pieces), 0)
    if split == "row":
        return torch.cat(list(pieces), 1)
    halves = [p.chunk(2, 0) for p in pieces]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)


def whole_shape(local: Sequence[int], split: Optional[str], size: int) -> Tuple[int, ...]:
    """The unsharded shape of a tensor whose local shard is ``local``, split ``split`` over ``size``
    ranks."""
    shape = list(local)
    if split in ("col", "glu"):
        shape[0] *= size
    elif split == "row":
        shape[1] *= size
    return tuple(shape)


TOKEN_CLASSIFIER = "ForTokenClassification"
SEQUENCE_CLASSIFIER = "ForSequenceClassification"   # a learned reward model (``reward.model``)
HEAD_KEYS = ("num_labels", "id2label", "label2id", "classifier_dropout", "problem_type")


def value_model_mapping(m: Mapping) -> Mapping:
    """The critic's mapping (``model.value_head``): the policy's trunk rules, and the scalar head
    as transformers' token-classification ``score`` layer with one label (replicated over TP)."""
    from dataclasses import replace

    trunk = tuple(r for r in m.rules if not r.mcore.startswith("output_layer."))
    head = (Rule("output_layer.weight", ("score.weight",)), Rule("output_layer.bias", ("score.bias",)))
    return replace(m, architecture=value_model_architecture(m.architecture), rules=trunk + head)


def value_model_architecture(causal_lm: str) -> str:
    """``Qwen3MoeForCausalLM`` -> ``Qwen3MoeForTokenClassification`` (every architecture of
    ``RULE_SETS`` has one in transformers)."""
    if causal_lm.endswith(TOKEN_CLASSIFIER):
        return causal_lm
    if not causal_lm.endswith("ForCausalLM"):
        raise ValueError(f"{causal_lm}: not a causal LM architecture")
    return causal_lm[:-len("ForCausalLM")] + TOKEN_CLASSIFIER


def trunk_config(hf_cfg: dict) -> dict:
    """A critic's (``value_model_config``) or a reward model's ``config.json`` as its causal
    LM's, which builds the same trunk; any other config as it is."""
    archs = hf_cfg.get("architectures") or []
    for head in (TOKEN_CLASSIFIER, SEQUENCE_CLASSIFIER):
        if len(archs) == 1 and archs[0].endswith(head):
            return {**{k: v for k, v in hf_cfg.items() if k not in HEAD_KEYS},
                    "architectures": [archs[0][:-len(head)] + "ForCausalLM"]}
    return hf_cfg


def num_labels(hf_cfg: dict) -> int:
    """The labels of a classifier's ``config.json`` as transformers counts them: ``id2label``'s
    size, else ``num_labels``, else transformers' default of 2."""
    if isinstance(hf_cfg.get("id2label"), dict):
        return len(hf_cfg["id2label"])
    return int(hf_cfg.get("num_labels", 2))


def reward_model_mapping(m: Mapping) -> Mapping:
    """A reward model's mapping: the trunk rules of its causal LM, and the scalar head as
    transformers' sequence-classification ``score`` layer (one label, no bias; replicated)."""
    from dataclasses import replace

    trunk = tuple(r for r in m.rules if not r.mcore.startswith("output_layer."))
    head = (Rule("output_layer.weight", ("score.weight",)),)
    return replace(m, architecture=m.architecture[:-len("ForCausalLM")] + SEQUENCE_CLASSIFIER,
                   rules=trunk + head)


def value_model_config(hf_cfg: dict) -> dict:
    """The critic's ``config.json``: the policy's, as a one-label token classifier with untied
    embeddings (the critic has no LM head to tie)."""
    archs = hf_cfg.get("architectures") or []
    if len(archs) != 1:
        raise ValueError(f"config.json architectures {archs}: expected exactly one")
    return {**hf_cfg, "architectures": [value_model_architecture(archs[0])], "num_labels": 1,
            "id2label": {"0": "value"}, "label2id": {"value": 0}, "tie_word_embeddings": False,
            "classifier_dropout": 0.0}
