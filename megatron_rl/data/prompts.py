"""Prompt datasets: rows from JSONL, JSON or Parquet files, a resumable sampler, per-DP-rank shards.

A row is ``{"prompt": str | [chat messages], "label": any, "metadata": {...}}`` (the key names are
configurable, dotted paths reach nested fields; verl's ``data_source`` / ``extra_info`` join the
metadata). A malformed row is an error naming the file and line (``on_bad_row="error"``), or
is skipped and counted (``"skip"``); so is a row without a label (``on_missing_label``). The sampler walks seeded per-epoch permutations; its state is
two integers (epoch, position), so a resumed run continues with the same next prompt. A step's
prompts are split across data-parallel ranks by whole prompts, so each prompt's G samples (its
group) are generated, scored and normalised on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_rl.data.files import MISSING, data_files, iter_objects, key_paths, lookup


@dataclass(frozen=True)
class PromptRow:
    """One dataset row: its index, the prompt (text or messages), the label and free metadata."""
    index: int                      # position in the dataset file (0-based)
    prompt: Any                     # str, or a list of {"role", "content"} messages
    label: Any = None
    metadata: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadReport:
    """The rows a dataset load kept and the ones it skipped, with why."""
    rows: List[PromptRow]
    skipped: List[Tuple[str, str]]  # (file:line, reason)


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


# verl's row fields handed to the reward as metadata (verl's compute_score gets them too)
VERL_METADATA = ("data_source", "extra_info", "ability")
LABEL_POLICIES = ("error", "skip", "allow")


def _row(obj: Any, index: int, prompt_key: str, label_key: str) -> Tuple[Optional[PromptRow], str]:
    if not isinstance(obj, dict):
        return None, f"a row must be a JSON object, got {type(obj).__name__}"
    prompt = lookup(obj, prompt_key)
    if prompt is MISSING:
        return None, f"missing field {prompt_key!r} (data.prompt_key)"
    bad = _check_prompt(prompt)
    if bad:
        return None, f"field {prompt_key!r}: {bad}"
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict):
        return None, "field 'metadata' must be an object"
    meta = {**{k: obj[k] for k in VERL_METADATA if obj.get(k) is not None}, **meta}
    label = lookup(obj, label_key)
    return PromptRow(index, prompt, None if label is MISSING else label, meta), ""


def load_prompts(path: str, *, prompt_key: str = "prompt", label_key: str = "label",
                 on_bad_row: str = "error", on_missing_label: str = "error") -> LoadReport:
    """Every row of the files ``path`` names (``files.data_files``). ``on_bad_row``: ``error`` |
    ``skip`` a malformed row. ``on_missing_label``: a row without ``label_key`` (absent or null)
    is an ``error`` naming the key, the count and the keys the rows do have (a reward scoring
    ``None`` would silently give 0 every step), is ``skip``ped, or is ``allow``ed (a reward that
    needs no label)."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"data.on_bad_row: {on_bad_row!r}; choose 'error' or 'skip'")
    if on_missing_label not in LABEL_POLICIES:
        raise ValueError(f"data.on_missing_label: {on_missing_label!r}; choose one of "
                         f"{', '.join(LABEL_POLICIES)}")
    rows, skipped, unlabeled = [], [], []
    for f in data_files(path):
        for place, obj, err in iter_objects(f):
            row = None
            if not err:
                row, err = _row(obj, len(rows) + len(skipped), prompt_key, label_key)
            if err:
                if on_bad_row == "error":
                    raise ValueError(f"{place}: {err} (set data.on_bad_row=skip to skip such rows)")
                skipped.append((place, err))
                continue
            if row.label is None and on_missing_label != "allow":
                unlabeled.append((place, obj))
                if on_missing_label == "skip":
                    skipped.append((place, f"no label {label_key!r} (data.on_missing_label=skip)"))
                    continue
            rows.append(row)
    if unlabeled and on_missing_label == "error":
        place, obj = unlabeled[0]
        raise ValueError(
            f"data.label_key: {label_key!r} is missing or null in {len(unlabeled)} of "
            f"{len(rows)} rows (first at {place}, whose keys are {', '.join(key_paths(obj))}); set "
            "data.label_key to the answer's key (a dotted path reaches nested fields, e.g. "
            "reward_model.ground_truth), data.on_missing_label=skip to drop those rows, or "
            "=allow for a reward that needs no label")
    if not rows:
        first = f", first: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise ValueError(f"{path}: no usable rows ({len(skipped)} skipped{first})")
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
        """The next ``n`` row indices, reshuffling (from the seed and epoch) at each epoch's end."""
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
        """Where the sampler is (epoch, position), for checkpoints."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Go back to where ``state_dict`` was taken."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


def shard_for_rank(items: Sequence[Any], dp_rank: int, dp_size: int) -> List[Any]:
    """This DP rank's contiguous share of a step's prompts (whole prompts; the count must divide)."""
    if len(items) % dp_size:
        raise ValueError(f"train.prompts_per_step={len(items)} is not a multiple of the data-"
                         f"parallel size {dp_size}; each rank needs whole prompt groups")
    k = len(items) // dp_size
    return list(items[dp_rank * k:(dp_rank + 1) * k])


def with_template_kwargs(tokenizer, kwargs: Dict[str, Any]):
    """``tokenizer`` whose chat template always sees ``kwargs`` (``data.chat_template_kwargs``,
    e.g. Qwen3's ``enable_thinking: false``) unless a call passes its own: every rendering, of
    prompts and of multi-turn observations alike, goes through ``apply_chat_template``."""
    if kwargs:
        base = tokenizer.apply_chat_template
        tokenizer.apply_chat_template = lambda *a, **k: base(*a, **{**kwargs, **k})
    return tokenizer


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
