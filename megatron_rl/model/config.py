"""The ``model`` config section: the policy, a megatron-core GPTModel built from a Hugging Face
config (``hf_config``: a model directory, its ``config.json``, or ``tiny:<name>`` for the built-in
tiny random models of ``model.tiny``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from megatron_rl.fields import ConfigError, field_


@dataclass
class ModelConfig:
    """The ``model`` section: the HF config, the attention and MoE backends, dtype, initial weights."""
    hf_config: str = field_("", help="the Hugging Face model directory (its weights are the "
                                     "starting point), its config.json, or tiny:<name> (random)")
    attention_backend: str = field_("auto", choices=("auto", "sdpa", "te"),
                                    help="auto: TransformerEngine when installed, else SDPA")
    token_dispatcher: str = field_("alltoall", choices=("alltoall", "allgather"),
                                   help="how tokens reach their experts across EP ranks")
    grouped_gemm: bool = field_(False, help="grouped-GEMM experts (GPU with TransformerEngine)")
    router_aux_loss_coef: float = field_(0.0, ge=0.0, help="load-balancing loss; off for RL")
    router_z_loss_coef: float = field_(0.0, ge=0.0, help="router z-loss; off for RL")
    params_dtype: str = field_("auto", choices=("auto", "bf16", "fp32"),
                               help="auto: bf16 on GPU, fp32 on CPU")
    hf_overrides: Dict[str, Any] = field_(default_factory=dict, help="config.json keys replaced, "
                                          "e.g. {max_position_embeddings: 8192}")
    allow_unknown_config_keys: bool = field_(False, help="ignore (and print) config.json keys "
                                             "megatron_rl does not know instead of refusing")
    init_from: str = field_("", help="a `convert import` checkpoint to start from; empty: the "
                                     "HF weights when hf_config is a directory holding them, "
                                     "else random initialisation (seeded by train.seed)")

    def hf_dict(self) -> Dict[str, Any]:
        """The HF ``config.json`` as a dict, ``hf_overrides`` applied; ``ConfigError`` naming
        ``model.hf_config`` when it is unusable."""
        import json
        from pathlib import Path

        # lazy: the config layer loads before the model code it describes
        from megatron_rl.model.tiny import tiny_hf_config

        if not self.hf_config:
            raise ConfigError("model.hf_config: required (a Hugging Face model directory, its "
                              "config.json, or tiny:qwen3_moe)")
        if self.hf_config.startswith("tiny:"):
            try:
                hf = tiny_hf_config(self.hf_config[len("tiny:"):])
            except KeyError as e:
                raise ConfigError(f"model.hf_config: {str(e).strip(chr(34) + chr(39))}") from None
        else:
            p = Path(self.hf_config)
            p = p / "config.json" if p.is_dir() else p
            try:
                hf = json.loads(p.read_text())
            except OSError:
                raise ConfigError(f"model.hf_config: {p} does not exist (give a Hugging Face "
                                  "model directory or its config.json)") from None
            except ValueError as e:
                raise ConfigError(f"model.hf_config: {p} is not valid JSON ({e})") from None
        return {**hf, **self.hf_overrides}

    def hf_model(self):
        """The parsed HF config; ``ConfigError`` naming ``model.hf_config`` when it is unusable."""
        # lazy: the config layer loads before the model code it describes
        from megatron_rl.model.hf_config import load_hf_config

        try:
            hf = load_hf_config(self.hf_dict(), self.allow_unknown_config_keys)
        except KeyError as e:
            raise ConfigError(f"model.hf_config: {str(e).strip(chr(34) + chr(39))}") from None
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if hf.ignored:
            import warnings

            warnings.warn("model.allow_unknown_config_keys: ignoring config.json keys "
                          + ", ".join(f"{k}={v!r}" for k, v in hf.ignored), stacklevel=2)
        return hf

    def options(self):
        """The builder's ``ModelOptions`` of this section (``auto`` dtype resolved)."""
        import torch

        # lazy: the config layer loads before the model code it describes
        from megatron_rl.model.build import ModelOptions

        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(self.params_dtype)
        if dtype is None:
            dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return ModelOptions(self.attention_backend, self.token_dispatcher, self.grouped_gemm,
                            self.router_aux_loss_coef, self.router_z_loss_coef, dtype)
