"""The reward registry (``rewards`` re-exports it; the built-in and user rewards register here,
below the package that imports them)."""

from megatron_rl.algo.registry import Registry

REWARDS = Registry("reward function")
