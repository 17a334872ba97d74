"""Configuration: the root ``RunConfig``, recipe loading with overrides, and ``ConfigError``.

The section dataclasses import ``megatron_rl.fields`` (the bottom of the import graph) while
``config.run`` imports them, so the root names are resolved lazily: importing a section never
drags in the whole config tree.
"""

from megatron_rl.fields import ConfigError

_LAZY = {"load_config": "load", "to_yaml": "load", "RunConfig": "run", "validate": "run",
         "validate_world": "run"}

__all__ = ["ConfigError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"megatron_rl.config.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'megatron_rl.config' has no attribute {name!r}")
