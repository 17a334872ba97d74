"""Named registries: plain dicts filled by a decorator; a lookup of an unknown name lists the known.

Every registry of the algorithm library (KL estimators, advantage estimators, weight functions,
policy losses) is one of these, so a typo in a recipe fails the same way everywhere.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Dict, Mapping


class UnknownNameError(KeyError):
    """A registry lookup of a name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class Registry(dict):
    """A ``name -> callable`` dict with a ``register`` decorator and helpful lookup errors."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str) -> Callable[[Callable], Callable]:
        """A decorator that files the function under ``name`` (twice is an error)."""
        def deco(fn: Callable) -> Callable:
            """File ``fn`` under ``name``; returns it unchanged."""
            if name in self:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self[name] = fn
            return fn

        return deco

    def get_fn(self, name: str) -> Callable:
        """The function registered as ``name``; an unknown name fails listing the known ones."""
        if name not in self:
            near = difflib.get_close_matches(str(name), list(self), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise UnknownNameError(
                f"unknown {self.what} {name!r}{hint}; known: {', '.join(sorted(self))}"
            )
        return self[name]


def keyword_params(fn: Callable, skip: tuple = ()) -> Dict[str, Any]:
    """The keyword-only parameters of ``fn`` with their defaults (``inspect.Parameter.empty`` if
    required): the tunable knobs a recipe may set for a registry entry."""
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in skip:
            out[p.name] = p.default
    return out


def check_params(what: str, name: str, params: Mapping[str, Any], accepted: Mapping[str, Any]) -> None:
    """Raise a ``TypeError`` naming any key of ``params`` that ``accepted`` (name -> default) does
    not list, or whose value is not of its default's kind (a number, a bool, a string)."""
    for key, value in params.items():
        if key not in accepted:
            near = difflib.get_close_matches(key, list(accepted), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise TypeError(
                f"{what} {name!r} has no parameter {key!r}{hint}; "
                f"its parameters: {', '.join(sorted(accepted)) or 'none'}"
            )
        kind = _kind(accepted[key])
        if kind is not None and _kind(value) != kind:
            raise TypeError(f"{what} {name!r}: parameter {key!r} is {value!r} "
                            f"({type(value).__name__}); it takes a {kind} (default "
                            f"{accepted[key]!r})")


def _kind(value: Any):
    """``"bool"``, ``"number"`` or ``"string"`` for a default that fixes a parameter's kind."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return None
