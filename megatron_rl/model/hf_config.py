"""Hugging Face ``config.json`` -> megatron-core ``TransformerConfig`` arguments.

The config is resolved through transformers' own config class for the architecture, so absent
keys take transformers' defaults and old and new spellings follow the installed transformers'
precedence (``rope_scaling`` wins over ``rope_parameters``, as transformers 5 lets it). Then every
key of ``config.json`` is accounted for (``model.hf_arch``): the architecture's builder reads it,
it is listed as irrelevant to the forward pass, it equals transformers' default, or the config is
refused naming the key and its value. ``allow_unknown_keys`` ignores the unknown ones instead and
records them in ``HFModel.ignored`` for the caller to print.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Tuple, Union

from megatron_rl.model.hf_arch import ARCHITECTURES, COMMON_IRRELEVANT, COMMON_MAPPED, Arch

REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size")


@dataclass(frozen=True)
class HFModel:
    """What the model builder needs from a HF config: TransformerConfig fields and GPTModel args."""

    architecture: str
    config: Dict[str, Any]          # TransformerConfig keyword arguments (model shape only)
    vocab_size: int
    max_position_embeddings: int
    rotary_base: float
    tie_word_embeddings: bool
    rotary: Tuple[Tuple[str, Any], ...] = (("position_embedding_type", "rope"),)  # GPTModel args
    yarn: Tuple[Tuple[str, Any], ...] = ()         # TransformerConfig attributes GPT YaRN reads
    proj_bias: bool = False                         # attention output projection has a bias
    ignored: Tuple[Tuple[str, Any], ...] = ()       # unknown keys ignored on request

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer (0 for a dense model)."""
        return self.config.get("num_moe_experts") or 0

    @property
    def moe_top_k(self) -> int:
        """Experts per token (0 for a dense model)."""
        return int(self.config.get("moe_router_topk") or 0) if self.num_experts else 0

    @property
    def moe_layers(self) -> Tuple[int, ...]:
        """The 0-based indices of the MoE layers, in order (megatron-core's ``moe_layer_freq``: an
        int ``k`` makes every ``k``-th layer, from the first, an MoE layer; a list says per layer).
        Expert routes index their layer axis in this order."""
        if not self.num_experts:
            return ()
        n, freq = int(self.config["num_layers"]), self.config.get("moe_layer_freq", 1)
        if isinstance(freq, int):
            return tuple(i for i in range(n) if i % freq == 0)
        return tuple(i for i, f in enumerate(freq) if f)


def read_config_json(path_or_dict: Union[str, Path, Dict[str, Any]]) -> Dict[str, Any]:
    """A ``config.json`` (or a directory holding one, or a dict) as a dict; ``ValueError`` naming the file."""
    if isinstance(path_or_dict, dict):
        return path_or_dict
    p = Path(path_or_dict)
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise ValueError(f"model.hf_config: {p} does not exist (give a Hugging Face model "
                         "directory or its config.json)")
    try:
        hf = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"model.hf_config: {p} is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"model.hf_config: {p} holds a JSON {type(hf).__name__}, not an object")
    return hf


def load_hf_config(path_or_dict: Union[str, Path, Dict[str, Any]],
                   allow_unknown_keys: bool = False) -> HFModel:
    """From a model directory, a ``config.json`` path, or the dict itself."""
    hf = read_config_json(path_or_dict)
    archs = hf.get("architectures") or []
    name = archs[0] if isinstance(archs, list) and archs else None
    if name not in ARCHITECTURES:
        raise ValueError(f"model.hf_config: architecture {name!r} is not supported; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    arch = ARCHITECTURES[name]
    resolved, defaults = _resolve(hf, name, arch)
    ignored = unknown_keys(hf, arch, defaults)
    if ignored and not allow_unknown_keys:
        shown = ", ".join(f"{k}={v!r}"[:80] for k, v in ignored[:4])
        more = f" and {len(ignored) - 4} more" if len(ignored) > 4 else ""
        raise ValueError(f"model.hf_config: config.json key(s) {shown}{more} are not known to "
                         f"megatron_rl for {name} and may change the model; remove them, or "
                         "ignore them with --allow-unknown-config-keys "
                         "(model.allow_unknown_config_keys=true)")
    try:
        cfg = arch.build(resolved)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"model.hf_config: {name} config is missing or mistypes {e}") from None
    rotary_base, rotary = cfg.pop("_rotary_base"), cfg.pop("_gpt_rope")
    yarn = rotary.pop("yarn", {})
    proj_bias = cfg.pop("_proj_bias", False)
    if cfg.get("kv_channels", 0) is None:
        del cfg["kv_channels"]
    return HFModel(name, cfg, int(resolved.vocab_size), int(resolved.max_position_embeddings),
                   float(rotary_base), bool(resolved.tie_word_embeddings),
                   tuple(sorted(rotary.items())), tuple(sorted(yarn.items())), proj_bias,
                   tuple(ignored))


def _resolve(hf: Dict[str, Any], name: str, arch: Arch):
    """``(transformers config object, its class defaults as a dict)``; a config transformers
    itself rejects is refused with transformers' first line."""
    import copy

    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[arch.model_type]
    kwargs = {k: copy.deepcopy(v) for k, v in hf.items() if k != "model_type"}
    try:
        resolved = cls(**kwargs)
    except Exception as e:  # transformers raises ValueError, KeyError, its own validation errors
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise ValueError(f"model.hf_config: transformers' {cls.__name__} rejects this "
                         f"config.json: {detail}") from None
    for keys in REQUIRED + arch.required:  # transformers' defaults describe a full-size model
        if not any(k in hf for k in keys.split("|")):
            raise ValueError(f"model.hf_config: config.json has no {keys.split('|')[0]!r}, which "
                             f"{name} needs")
    return resolved, cls().to_dict()


def unknown_keys(hf: Dict[str, Any], arch: Arch, defaults: Dict[str, Any]):
    """``[(key, value)]`` of config.json keys that are neither read, nor irrelevant, nor equal to
    transformers' default for the architecture."""
    known = COMMON_MAPPED | arch.mapped | set(COMMON_IRRELEVANT) | set(arch.irrelevant)
    return [(k, v) for k, v in sorted(hf.items())
            if k not in known and not (k in defaults and defaults[k] == v)]
