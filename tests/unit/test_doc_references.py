"""What the README and docs/ name exists: every config key they write in backticks is a key of
the schema (or a section of keys), every module path (``algo.kl``, ``train.batches.packed_lengths``)
is a module or one of its names, and every repository file they mention or link is there."""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# names from other projects that the docs cite on purpose: verl's keys in the README's mapping
# table, and Hugging Face checkpoint and tensor names
FOREIGN = {"data.train_files", "data.val_files", "data.train_batch_size", "data.max_prompt_length",
           "critic.optim.lr", "critic.cliprange_value", "rollout.mode", "rollout.response_length"}
HF_NAME = re.compile(r"^model\.(safetensors|embed_tokens|layers|norm)\b")
REPO_DIRS = ("configs/", "bench/", "launch/", "megatron_rl/", "tests/", "docs/", "tools/", ".ci/")


def _config_keys() -> set:
    from megatron_rl.config.doc import render

    return {re.match(r"\| `([^`]+)`", r).group(1) for r in render().splitlines()
            if r.startswith("| `")}


KEYS = _config_keys()
SECTIONS = sorted({k.split(".")[0] for k in KEYS})
FREE_FORM = [k for k in KEYS if k.endswith(".params") or k.endswith(".components")]
KEY_LIKE = re.compile(r"^(%s)\.[A-Za-z_][\w.]*" % "|".join(SECTIONS))


def _names_a_module(dotted: str) -> bool:
    """``a.b[.c...]`` is ``megatron_rl.a.b`` (a module) or a name defined in such a module."""
    parts = dotted.split(".")
    for cut in range(len(parts), 1, -1):
        try:
            mod = importlib.import_module("megatron_rl." + ".".join(parts[:cut]))
        except ImportError:
            continue
        obj = mod
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def _is_known(token: str) -> bool:
    key = token.rstrip(".:")
    if key in KEYS or any(k.startswith(key + ".") for k in KEYS):
        return True
    if any(key.startswith(k + ".") for k in FREE_FORM) or key in FOREIGN or HF_NAME.match(key):
        return True
    return _names_a_module(key)


def _backticked(text: str):
    for m in re.finditer(r"`([^`\n]+)`", text):
        yield from re.split(r"[\s=,()\[\]]+", m.group(1))


def unknown_keys(text: str) -> list:
    """Backticked tokens shaped like config keys that name nothing."""
    out = []
    for tok in _backticked(text):
        m = KEY_LIKE.match(tok)
        if m and not _is_known(m.group(0)):
            out.append(m.group(0))
    return out


def missing_files(doc: pathlib.Path, text: str) -> list:
    """Repository paths in backticks and relative Markdown links that are not there."""
    out = []
    for tok in _backticked(text):
        path = tok.split("::")[0].rstrip(":.")
        if path.startswith(REPO_DIRS) and not any(c in path for c in "*<>{}$"):
            if not (ROOT / path).exists():
                out.append(path)
    for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"^[a-z]+:", link) and not (doc.parent / link).exists():
            out.append(link)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_config_key_a_doc_names_exists(doc):
    assert not unknown_keys(doc.read_text()), f"{doc.name} names keys the config does not have"


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_file_a_doc_names_exists(doc):
    assert not missing_files(doc, doc.read_text()), f"{doc.name} names files that are not there"


def test_the_checks_catch_a_renamed_key_module_or_file():
    text = ("set `train.stepz=3` or `rollout.max_staleness=1`; see `algo.kl` and "
            "`algo.klx`, `bench/async_step.py`, `bench/no_such.py` and [x](no_such.md)")
    assert unknown_keys(text) == ["train.stepz", "algo.klx"]
    assert missing_files(DOCS[0], text) == ["bench/no_such.py", "no_such.md"]
