"""Rewards from the user's own code: ``reward.name: path/to/file.py:fn`` or ``pkg.module:fn``.

Loaded once per process and registered under that name, so everything that scores by name
(single responses, multi-turn environments, ``megatron-rl eval``) runs it like a built-in. Two
signatures are accepted, checked at load:
- ours: ``fn(response, label, *, prompt="", metadata=None, **params) -> float``;
- verl's ``custom_reward_function``: ``fn(data_source, solution_str, ground_truth,
  extra_info=None) -> float | {"score": float, ...}``; ``data_source`` and ``extra_info`` come
  from the row's metadata (verl's parquet columns, ``data.prompts``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from megatron_rl.rewards.base import REWARDS

VERL_PARAMS = ("data_source", "solution_str", "ground_truth")
OURS = "(response, label, *, prompt='', metadata=None, **params)"


def is_user_reward(name: str) -> bool:
    """Whether ``name`` names a user reward (``file.py:function``) rather than a registered one."""
    return ":" in name


def register_user_reward(name: str) -> Callable:
    """Load ``name`` (once) and register it in ``REWARDS``; ``ValueError`` naming the file or
    module and what is wrong."""
    if name in REWARDS:
        return REWARDS[name]
    where, _, attr = name.rpartition(":")
    if not where or not attr:
        raise ValueError(f"{name!r}: expected path/to/file.py:function or package.module:function")
    module = _load_module(where)
    fn = getattr(module, attr, None)
    if not callable(fn):
        known = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"{where} has no function {attr!r}; its functions: "
                         f"{', '.join(known) or 'none'}")
    REWARDS[name] = _adapted(fn, name)
    return REWARDS[name]


def _load_module(where: str):
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"{where}: no such file")
        mod_name = f"megatron_rl_user_reward_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 -- whatever the user's file raises, said in one line
            del sys.modules[mod_name]
            raise ValueError(f"{where}: importing it failed ({type(e).__name__}: {e})") from None
        return module
    try:
        return importlib.import_module(where)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{where}: cannot import it ({type(e).__name__}: {e})") from None


def _adapted(fn: Callable, name: str) -> Callable:
    """``fn`` with our signature: as it is, or verl's wrapped."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        raise ValueError(f"{name}: its signature cannot be read") from None
    names = list(params)
    if all(p in params for p in VERL_PARAMS):
        return _verl_wrapper(fn)
    positional = [p for p in params.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(positional) < 2 or len(required) > 2:
        raise ValueError(f"{name} takes ({', '.join(names)}); a reward takes {OURS}, or verl's "
                         "(data_source, solution_str, ground_truth, extra_info=None)")
    return fn


def _verl_wrapper(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def reward(response: str, label: Any, *, prompt: str = "", metadata=None) -> float:
        """verl's ``compute_score`` called with our reward signature."""
        meta = metadata or {}
        out = fn(data_source=meta.get("data_source"), solution_str=response, ground_truth=label,
                 extra_info=meta.get("extra_info"))
        return out["score"] if isinstance(out, dict) else out

    return reward
