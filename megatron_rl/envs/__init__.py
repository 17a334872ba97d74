"""Environments for multi-turn rollouts: a registry of classes with ``reset`` / ``step``.

An episode is ``prompt, a_1, x_1, a_2, x_2, ...``: the policy's actions ``a_j`` (engine tokens,
trained on) and the environment's observations ``x_j`` (tool results, user turns: context only,
never actions). One ``Environment`` instance lives for one episode:

    env = ENVIRONMENTS.get_fn(name)(score=..., **params)
    first = env.reset(row)                 # text (or token ids) after the prompt, or None
    result = env.step(action_text)         # StepResult(observation, reward, done, ...)
    ...
    bonus = env.final_reward()             # once, when the episode ends (done or cut off)

The episode's reward is the sum of its step rewards plus ``final_reward()``. ``score(text)``
applies the run's ``reward`` section to a final answer (what a tool environment rewards).
The collector (``rollout.multiturn``) treats any exception or malformed return as a failed episode
(recorded with its turn and message; the run goes on).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from megatron_rl.algo.registry import check_params, keyword_params
from megatron_rl.envs.base import ENVIRONMENTS, Environment, Observation, StepResult  # noqa: F401 (the package's API)


def load_environment_module(spec: str) -> None:
    """Import ``spec`` (a ``.py`` file or a dotted module) so that its ``ENVIRONMENTS.register``
    decorators run; ``ValueError`` in one line when it cannot be imported."""
    import importlib
    import importlib.util
    import os
    import sys

    try:
        if spec.endswith(".py"):
            path = os.path.abspath(spec)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no such file {path}")
            name = "megatron_rl_user_env_" + str(abs(hash(path)))
            if name in sys.modules:
                return
            mod_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            try:
                mod_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        else:
            importlib.import_module(spec)
    except Exception as e:  # noqa: BLE001 -- user code: one line naming the module
        raise ValueError(f"cannot import {spec!r}: {type(e).__name__}: {e}") from None


def environment_params(name: str) -> dict:
    """The keyword parameters environment ``name`` accepts (for checking ``env.params``)."""
    cls = ENVIRONMENTS.get_fn(name)
    return keyword_params(cls.__init__, skip=("score",))


def make_environment(name: str, params: dict, score: Optional[Callable[[str], float]] = None
                     ) -> Environment:
    """A fresh environment ``name`` with ``params`` (an unknown parameter raises ``TypeError``)."""
    cls = ENVIRONMENTS.get_fn(name)
    check_params("environment", name, params, environment_params(name))
    return cls(score=score, **params)


def check_step_result(result: Any) -> StepResult:
    """``result`` if it is a well-formed ``StepResult``, else ``TypeError`` saying what is wrong."""
    if not isinstance(result, StepResult):
        raise TypeError(f"step() returned {type(result).__name__}, not a StepResult")
    check_observation(result.observation)
    if isinstance(result.reward, bool) or not isinstance(result.reward, (int, float)):
        raise TypeError(f"step() reward is {type(result.reward).__name__}, not a number")
    if not isinstance(result.done, bool):
        raise TypeError(f"step() done is {type(result.done).__name__}, not a bool")
    return result


def check_observation(obs: Any) -> Observation:
    """``obs`` if it is a valid observation (None, text, or token ids), else ``ValueError`` naming
    what it is."""
    if obs is None or isinstance(obs, str):
        return obs
    if isinstance(obs, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in obs):
        return obs
    raise TypeError(f"observation is {type(obs).__name__}; give text, a list of token ids, or None")


from megatron_rl.envs import tools  # noqa: E402,F401  (registers the built-ins)
