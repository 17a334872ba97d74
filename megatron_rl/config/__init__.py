"""Configuration: the root ``RunConfig``, recipe loading with overrides, and ``ConfigError``."""

from megatron_rl.config.fields import ConfigError
from megatron_rl.config.load import load_config, to_yaml
from megatron_rl.config.run import RunConfig, validate, validate_world

__all__ = ["ConfigError", "RunConfig", "load_config", "to_yaml", "validate", "validate_world"]
