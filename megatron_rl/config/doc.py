"""``docs/config.md``: every config key with its default, constraint and help text, generated
from the dataclasses (``python -m megatron_rl.config.doc > docs/config.md``; a test keeps the
file equal to this output, so it cannot go stale)."""

from __future__ import annotations

import dataclasses
from typing import Any, List

from megatron_rl.config.run import RunConfig

HEADER = """# Config keys

Every key of a recipe, generated from the config dataclasses (`megatron_rl/*/config.py`) by
`python -m megatron_rl.config.doc > docs/config.md`. Set them in a recipe or as `key=value`
after the command. Algorithm parameters (`algo.advantage.params`, `algo.loss.params`) are the
keyword arguments of the registered functions: see [api.md](api.md).
"""


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def _constraint(meta) -> str:
    parts = []
    if meta.get("choices"):
        parts.append(" \\| ".join(f"`{c}`" for c in meta["choices"]))
    for key, word in (("ge", ">="), ("gt", ">"), ("le", "<=")):
        if meta.get(key) is not None:
            parts.append(f"{word} {meta[key]}")
    return ", ".join(parts)


def _rows(cls, prefix: str) -> List[str]:
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        default = _default(f)
        if dataclasses.is_dataclass(default):
            out.append(f"\n## `{key}`\n\n| key | default | allowed | what |\n|---|---|---|---|")
            out += _rows(type(default), key)
            continue
        text = str(f.metadata.get("help", "")).replace("|", "\\|")
        shown = repr(default).replace("|", "\\|")
        out.append(f"| `{key}` | `{shown}` | {_constraint(f.metadata)} | {text} |")
    return out


def render() -> str:
    """docs/config.md: every config key with its default, constraint and help, from the dataclasses."""
    return HEADER + "\n".join(_rows(RunConfig, "")) + "\n"


if __name__ == "__main__":
    print(render(), end="")
