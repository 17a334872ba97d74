"""Declarative field constraints for config dataclasses, checked with the key path in the message.
At the bottom of the import graph (it imports nothing of the package): every section's config
module (algo, parallel, model, data, ...) builds on it.

A section declares ``x: int = field_(1, ge=1)`` or ``name: str = field_("adam", choices=(...))``;
``check_fields(obj, "section")`` walks nested dataclasses and raises ``ConfigError`` naming the
first violation, e.g. ``rollout.n_samples_per_prompt: must be >= 1, got 0``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence


class ConfigError(ValueError):
    """A configuration problem; the message names the key path (or file) and how to fix it."""


def field_(default: Any = dataclasses.MISSING, *, ge: Optional[float] = None,
           gt: Optional[float] = None, le: Optional[float] = None,
           choices: Optional[Sequence[Any]] = None, help: str = "", default_factory=dataclasses.MISSING):
    """A dataclass field with ``help`` and bounds (``ge``, ``gt``, ``le``, ``choices``) in its
    metadata, which ``check_fields`` enforces and docs/config.md shows."""
    meta = {"ge": ge, "gt": gt, "le": le, "choices": tuple(choices) if choices else None, "help": help}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_fields(obj: Any, prefix: str) -> None:
    """``ConfigError`` naming the first field of ``obj`` outside its bounds or choices."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            check_fields(value, path)
            continue
        if value is None:
            continue
        m = f.metadata
        if m.get("choices") and value not in m["choices"]:
            raise ConfigError(f"{path}: must be one of {', '.join(map(str, m['choices']))}; got {value!r}")
        for key, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                              ("le", lambda v, b: v <= b, "<=")):
            bound = m.get(key)
            if bound is not None and not ok(value, bound):
                raise ConfigError(f"{path}: must be {word} {bound}; got {value!r}")
