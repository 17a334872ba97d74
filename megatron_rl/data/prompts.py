"""Prompt datasets: rows from JSONL or Parquet, a resumable sampler, per-DP-rank shards.

A row is ``{"prompt": str | [chat messages], "label": any, "metadata": {...}}`` (the key names are
configurable). A malformed row is an error naming the file and line (``on_bad_row="error"``), or
is skipped and counted (``"skip"``). The sampler walks seeded per-epoch permutations; its state is
two integers (epoch, position), so a resumed run continues with the same next prompt. A step's
prompts are split across data-parallel ranks by whole prompts, so each prompt's G samples (its
group) are generated, scored and normalised on one rank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class PromptRow:
    index: int                      # position in the dataset file (0-based)
    prompt: Any                     # str, or a list of {"role", "content"} messages
    label: Any = None
    metadata: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadReport:
    rows: List[PromptRow]
    skipped: List[Tuple[int, str]]  # (line number, reason)


def _check_prompt(p: Any) -> Optional[str]:
    if isinstance(p, str):
        return None if p.strip() else "empty prompt"
    if isinstance(p, list) and p:
        for m in p:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                return "chat prompt entries need string 'role' and 'content'"
        return None
    return f"prompt must be a non-empty string or list of chat messages, got {type(p).__name__}"


def _row(obj: Any, index: int, prompt_key: str, label_key: str) -> Tuple[Optional[PromptRow], str]:
    if not isinstance(obj, dict):
        return None, f"a row must be a JSON object, got {type(obj).__name__}"
    if prompt_key not in obj:
        return None, f"missing field {prompt_key!r} (data.prompt_key)"
    bad = _check_prompt(obj[prompt_key])
    if bad:
        return None, f"field {prompt_key!r}: {bad}"
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict):
        return None, "field 'metadata' must be an object"
    return PromptRow(index, obj[prompt_key], obj.get(label_key), meta), ""


def _jsonl_objects(path: Path):
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, None, f"invalid UTF-8 at byte {e.start}"
                continue
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text), ""
            except json.JSONDecodeError as e:
                yield line_no, None, f"invalid JSON ({e.msg} at column {e.colno})"


def _parquet_objects(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 -- pyarrow raises several types for a bad file
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    for i, obj in enumerate(table.to_pylist(), 1):
        yield i, obj, ""


def load_prompts(path: str, *, prompt_key: str = "prompt", label_key: str = "label",
                 on_bad_row: str = "error") -> LoadReport:
    """All rows of a ``.jsonl`` / ``.parquet`` file (``on_bad_row``: ``error`` | ``skip``)."""
    p = Path(path)
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"data.on_bad_row: {on_bad_row!r}; choose 'error' or 'skip'")
    if not p.is_file():
        raise ValueError(f"data.path: {p} does not exist")
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"data.path: {p} is neither .jsonl nor .parquet")
    objects = _jsonl_objects(p) if suffix == ".jsonl" else _parquet_objects(p)
    rows, skipped = [], []
    for line_no, obj, err in objects:
        row = None
        if not err:
            row, err = _row(obj, len(rows) + len(skipped), prompt_key, label_key)
        if err:
            if on_bad_row == "error":
                raise ValueError(f"{p}:{line_no}: {err} (set data.on_bad_row=skip to skip such rows)")
            skipped.append((line_no, err))
            continue
        rows.append(row)
    if not rows:
        raise ValueError(f"{p}: no usable rows ({len(skipped)} skipped)")
    return LoadReport(rows, skipped)


class PromptSampler:
    """Seeded epochs over ``num_rows`` rows; ``next_indices(n)`` crosses epoch ends; the state is
    ``{"epoch", "position"}``."""

    def __init__(self, num_rows: int, seed: int = 0, shuffle: bool = True):
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(self.num_rows))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=g).tolist()

    def next_indices(self, n: int) -> List[int]:
        out = []
        while len(out) < n:
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(n - len(out), self.num_rows - self.position)
            out += self._order[self.position:self.position + take]
            self.position += take
        return out

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


def shard_for_rank(items: Sequence[Any], dp_rank: int, dp_size: int) -> List[Any]:
    """This DP rank's contiguous share of a step's prompts (whole prompts; the count must divide)."""
    if len(items) % dp_size:
        raise ValueError(f"train.prompts_per_step={len(items)} is not a multiple of the data-"
                         f"parallel size {dp_size}; each rank needs whole prompt groups")
    k = len(items) // dp_size
    return list(items[dp_rank * k:(dp_rank + 1) * k])


def chat_token_ids(tokenizer, messages, add_generation_prompt: bool) -> List[int]:
    """The chat template's token ids for ``messages``. transformers 5 returns a ``BatchEncoding``
    (a Mapping, not a dict) where 4.x returned the list: taking ``list()`` of the former would
    give its keys."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        tokenize=True)
    return [int(t) for t in (ids["input_ids"] if isinstance(ids, Mapping) else ids)]


def render_prompt(row: PromptRow, tokenizer, *, chat: bool, max_tokens: int) -> List[int]:
    """Token ids of a prompt: chat messages (or ``chat=True``) through the tokenizer's chat
    template with the generation prompt; plain strings encoded as they are."""
    if isinstance(row.prompt, list) or chat:
        messages = row.prompt if isinstance(row.prompt, list) else [{"role": "user", "content": row.prompt}]
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.chat_template: the tokenizer has no chat template; use plain "
                             "string prompts or a tokenizer that ships one")
        ids = chat_token_ids(tokenizer, messages, add_generation_prompt=True)
    else:
        ids = tokenizer.encode(row.prompt, add_special_tokens=False)
    if len(ids) > max_tokens:
        raise ValueError(f"prompt of row {row.index} has {len(ids)} tokens, more than "
                         f"rollout.max_prompt_len={max_tokens}")
    return ids
