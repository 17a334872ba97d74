"""Synthetic tasks shipped with the package (the CPU demo and tests) and their word-level tokenizer.

Each task turns short digit strings into a prompt and a label; the reward is ``exact_match`` of
the response (decoded up to end-of-sequence) against the label. Tokens are whole words, so a tiny
random model can learn the tasks in minutes:

    reverse: "reverse 3 1 4 =" -> "4 1 3"      copy: "copy 3 1 4 =" -> "3 1 4"
    sort:    "sort 3 1 4 ="    -> "1 3 4"      add:  "add 12 + 7 =" -> "1 9" (digits of the sum)
    repeat:  "repeat 3 1 4 =" -> "3 1 4 3 1 4 3 ..." (``answer_len`` words: long responses)
    lookup:  "lookup 3 1 4 =" -> a digit hashed from the key: only the ``lookup`` tool
             environment (``envs.tools``) knows them; a policy must call it (multi-turn)

``repeat`` is the long-response task: its answer runs to ``answer_len`` words (thousands, for
RL at long context on CPU), and a policy only has to continue a period it has seen, which a tiny
model learns; pair it with fixed-length generation (``rollout.ignore_eos``) and ``word_match``.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Callable, Dict, List, Tuple

TASKS: Dict[str, Callable[..., Tuple[str, str]]] = {}
LONG_TASKS = ("repeat",)     # the tasks that take ``answer_len``
SPECIALS = ["<pad>", "<eos>", "<unk>"]
# appended words only: a word's id is its index, and trained checkpoints depend on it
WORDS = [str(d) for d in range(10)] + ["reverse", "copy", "sort", "add", "+", "=", "repeat",
                                      "lookup", "call", "result"]


def _task(name):
    def deco(fn):
        """File ``fn`` as task ``name``; returns it unchanged."""
        TASKS[name] = fn
        return fn
    return deco


def _digits(rng: random.Random, n: int) -> List[str]:
    return [str(rng.randrange(10)) for _ in range(n)]


@_task("reverse")
def _reverse(rng, n):
    d = _digits(rng, n)
    return f"reverse {' '.join(d)} =", " ".join(reversed(d))


@_task("copy")
def _copy(rng, n):
    d = _digits(rng, n)
    return f"copy {' '.join(d)} =", " ".join(d)


@_task("sort")
def _sort(rng, n):
    d = _digits(rng, n)
    return f"sort {' '.join(d)} =", " ".join(sorted(d))


@_task("add")
def _add(rng, n):
    a, b = rng.randrange(10 ** n), rng.randrange(10 ** n)
    return f"add {' '.join(str(a))} + {' '.join(str(b))} =", " ".join(str(a + b))


@_task("repeat")
def _repeat(rng, n, answer_len: int = 64):
    d = _digits(rng, n)
    return f"repeat {' '.join(d)} =", " ".join(d[i % n] for i in range(answer_len))


def lookup_value(key: str, salt: int = 0, value_len: int = 2) -> str:
    """The hidden table of ``synthetic:lookup``: ``value_len`` digit words hashed from the key's
    words (stable across processes and Python versions; no model can compute it)."""
    digest = hashlib.sha256(f"{salt}:{' '.join(str(key).split())}".encode()).digest()
    return " ".join(str(b % 10) for b in digest[:value_len])


@_task("lookup")
def _lookup(rng, n):
    key = " ".join(_digits(rng, n))
    return f"lookup {key} =", lookup_value(key, 0, 1), {"key": key, "salt": 0, "value_len": 1}


def make_rows(task: str, count: int, *, min_len: int = 2, max_len: int = 5, seed: int = 0,
              answer_len: int = 0) -> List[dict]:
    """``count`` dataset rows (``prompt``, ``label``, ``metadata.task``) of ``task``;
    ``answer_len`` (words) for the long tasks (``LONG_TASKS``; 0: the task's default)."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {', '.join(sorted(TASKS))}")
    if answer_len and task not in LONG_TASKS:
        raise ValueError(f"an answer length applies to synthetic:{'/'.join(LONG_TASKS)} only, "
                         f"not synthetic:{task}")
    kw = {"answer_len": answer_len} if answer_len else {}
    rng = random.Random(f"{task}:{seed}")
    rows = []
    for _ in range(count):
        prompt, label, *meta = TASKS[task](rng, rng.randint(min_len, max_len), **kw)
        rows.append({"prompt": prompt, "label": label, "metadata": {"task": task, **(meta or [{}])[0]}})
    return rows


def write_jsonl(rows: List[dict], path) -> Path:
    """Write ``rows`` as JSON lines to ``path`` (parents created); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def word_tokenizer():
    """A ``PreTrainedTokenizerFast`` over ``SPECIALS + WORDS`` split on whitespace (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # padding is <eos> (as in most LLM tokenizers): were <pad> special, decoding would drop it and
    # a policy could end its answer with pads instead of learning to stop
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<eos>", eos_token="<eos>",
                                   unk_token="<unk>")
