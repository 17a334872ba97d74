"""One config.json variant at a time: transformers writes a tiny random model of it, ``convert
import`` imports it, and the Megatron logits are compared with transformers' own.

Outcomes: ``ok`` (with the logit difference the import's own check measured), ``refused`` (the
import's one-line error), or ``transformers_fails`` (transformers cannot build the variant; then
``ours`` is what our config loader said about it, which must be a refusal).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Tuple

from megatron_rl.checkpoint.convert import import_hf

Case = Tuple[str, str, Dict[str, Any], Dict[str, Any]]  # id, tiny model, overrides, json edits


def _line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:400]


def _config_error(cfg: Dict[str, Any]) -> str:
    from megatron_rl.model.hf_config import load_hf_config

    try:
        load_hf_config(cfg)
    except ValueError as e:
        return str(e)
    return "NO ERROR"


def run_case(root: Path, tiny: str, overrides: Dict[str, Any], edits: Dict[str, Any]) -> dict:
    from megatron_rl.model.tiny import tiny_hf_config, write_tiny_hf_model

    hf_dir, ckpt = root / "hf", root / "mc"
    try:
        write_tiny_hf_model(tiny, hf_dir, seed=5, **overrides)
    except Exception as e:  # noqa: BLE001 - transformers refuses the variant itself
        return {"outcome": "transformers_fails", "transformers": _line(e),
                "ours": _config_error({**tiny_hf_config(tiny, **overrides), **edits})}
    # every key transformers' config class defines, not only those save_pretrained writes
    # (non-default ones): each must be accounted for, then the hand edits
    from transformers import AutoConfig

    full = AutoConfig.from_pretrained(hf_dir).to_dict()
    (hf_dir / "config.json").write_text(json.dumps({**full, **edits}))
    try:  # the import's own check against transformers, reporting any difference
        report = import_hf(hf_dir, ckpt, tolerance=float("inf"))
    except ValueError as e:
        return {"outcome": "refused", "message": str(e)}
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    return {"outcome": "ok", **report.verified}


def flips(rank: int, world: int, tmp: str, cases: List[Case]) -> dict:
    return {case: run_case(Path(tmp) / case, tiny, overrides, edits)
            for case, tiny, overrides, edits in cases}
