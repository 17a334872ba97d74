"""The ``env`` config section: the environment of multi-turn rollouts (empty name: single-turn)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from megatron_rl.algo.registry import check_params
from megatron_rl.envs import ENVIRONMENTS, environment_params, load_environment_module
from megatron_rl.fields import ConfigError, field_


@dataclass
class EnvConfig:
    """The ``env`` section: a multi-turn environment and its limits (empty name: single-turn)."""
    name: str = field_("", help="a registered environment (envs.ENVIRONMENTS: calculator, python, "
                                "lookup, ...); empty: single-turn responses scored by `reward`")
    params: Dict[str, Any] = field_(default_factory=dict, help="keyword arguments of the "
                                    "environment, checked at load")
    module: str = field_("", help="a .py file or module imported first: it registers your own "
                                  "environments with @ENVIRONMENTS.register(name)")
    max_turns: int = field_(4, ge=1, help="LLM turns per episode; then it ends truncated")
    max_turn_tokens: int = field_(0, ge=0, help="tokens per LLM turn; 0: what is left of "
                                                "rollout.max_response_len (the whole episode's)")
    max_obs_tokens: int = field_(256, ge=1, help="longer observations are cut (env/obs_cut)")
    render: str = field_("auto", choices=("auto", "plain", "chat"),
                         help="observation tokens: plain text, or the chat template's tool "
                              "message (auto: chat when data.chat_template)")
    role: str = field_("tool", help="chat role of observations (tool, user, ...)")

    def check(self, prefix: str = "env") -> None:
        """``ConfigError`` for an unknown environment or parameters it does not take."""
        if self.module:
            try:
                load_environment_module(self.module)
            except ValueError as e:
                raise ConfigError(f"{prefix}.module: {e}") from None
        if not self.name:
            return
        try:
            ENVIRONMENTS.get_fn(self.name)
        except KeyError as e:
            raise ConfigError(f"{prefix}.name: {e}") from None
        try:
            check_params("environment", self.name, self.params, environment_params(self.name))
        except TypeError as e:
            raise ConfigError(f"{prefix}.params: {e}") from None
        try:   # value checks of the constructor (e.g. max_tool_calls >= 1), at load time
            ENVIRONMENTS.get_fn(self.name)(score=None, **self.params)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{prefix}.params: {e}") from None
