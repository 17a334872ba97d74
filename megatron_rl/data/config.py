"""The ``data`` config section: where prompts come from and how they become token ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from megatron_rl.fields import field_


@dataclass
class DataConfig:
    """The ``data`` section: where prompts come from and how rows are read."""
    path: str = field_("synthetic:reverse",
                       help="a .jsonl / .json (array) / .parquet file, a directory of them, a glob "
                            "(data/train-*.parquet), or synthetic:<task>")
    prompt_key: str = field_("prompt", help="the prompt's key (a string or chat messages); a "
                                            "dotted path reaches nested fields")
    label_key: str = field_("label", help="the answer's key, handed to the reward; a dotted path "
                                          "reaches nested fields (verl: reward_model.ground_truth)")
    val_path: str = field_("", help="a validation set (same formats and keys as data.path), "
                                    "scored every train.val_every steps")
    on_bad_row: str = field_("error", choices=("error", "skip"),
                             help="a malformed or too-long row: error naming it, or skip it (the "
                                  "count and first reason are printed)")
    on_missing_label: str = field_("error", choices=("error", "skip", "allow"),
                                   help="a row without label_key: error at load, skip it, or "
                                        "allow it (a reward that needs no label)")
    chat_template: bool = field_(False, help="wrap string prompts in the tokenizer's chat template")
    chat_template_kwargs: Dict[str, Any] = field_(
        default_factory=dict, help="variables for the chat template, e.g. {enable_thinking: false} "
                                   "(Qwen3)")
    tokenizer: str = field_("", help="tokenizer dir; empty: the model's; 'word': the synthetic "
                                     "tasks' word-level tokenizer")
    shuffle: bool = field_(True, help="a new prompt order each pass over the data")
    seed: int = field_(0, help="the shuffle's seed (and the synthetic tasks' rows)")
    synthetic_rows: int = field_(10000, ge=1, help="rows of a synthetic:<task> dataset")
    synthetic_min_len: int = field_(2, ge=1, help="synthetic tasks: fewest words in a prompt")
    synthetic_max_len: int = field_(4, ge=1, help="synthetic tasks: most words in a prompt")
    synthetic_answer_len: int = field_(0, ge=0, help="words in each answer of synthetic:repeat "
                                                     "(the long-response task); 0: its default")
