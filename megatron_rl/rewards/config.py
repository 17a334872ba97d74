"""The ``reward`` config section: which registered reward function (or reward service,
``http``) scores responses."""

from __future__ import annotations

import os
import re
import string
from dataclasses import asdict, dataclass
from typing import Any, Dict, List

from megatron_rl.algo.registry import check_params, keyword_params
from megatron_rl.fields import ConfigError, field_
from megatron_rl.rewards import Component, REWARDS
from megatron_rl.rewards.http import HttpSettings
from megatron_rl.rewards.user import is_user_reward, register_user_reward

SERVICE_REWARDS = ("http",)   # scored in batches by a service (reward.http), not per response
MODEL_REWARD = "model"        # scored by the learned reward model (reward.model) on the trainer
TINY_RM = "tiny:digit_score"  # the CPU demo's reward model, made under train.output_dir on first use
DEFAULT_JUDGE = ("Rate how well the response answers the prompt, from 0 (wrong or useless) to 10 "
                 "(correct and complete). Reply with the number only.\n\nPrompt:\n{prompt}\n\n"
                 "Response:\n{response}\n\nReference answer (may be empty):\n{label}\n\nScore:")


@dataclass
class RewardComponentConfig:
    """One weighted component of a composite reward."""
    name: str = field_("exact_match", help="a built-in reward or path/to/file.py:fn")
    weight: float = field_(1.0, help="its factor in the sum")
    params: Dict[str, Any] = field_(default_factory=dict, help="keyword arguments of the reward")


@dataclass
class HttpRewardConfig:
    """``reward.http``: the reward service that ``reward.name: http`` (or a component named
    ``http``) calls; rewards/http.py states both protocols and the failure policy."""
    url: str = field_("", help="json: the endpoint (http://host:port/score); openai: the API base "
                               "(http://host:8000/v1) or the full .../chat/completions URL")
    protocol: str = field_("json", choices=("json", "openai"),
                           help="json: {items: [{prompt, response, label, metadata}]} in, "
                                "{scores: [...]} out; openai: one chat completion per response "
                                "(an LLM judge)")
    model: str = field_("", help="openai: the judge's served model name")
    prompt_template: str = field_(DEFAULT_JUDGE, help="openai: the judge's message, with {prompt}, "
                                  "{response} and {label} (a literal brace doubled: {{ }})")
    system_prompt: str = field_("", help="openai: a system message before it (empty: none)")
    score_regex: str = field_(r"-?\d+(?:\.\d+)?", help="openai: the score is the first match in "
                              "the judge's reply (its first group, if it has one)")
    score_scale: float = field_(1.0, help="openai: the parsed number is multiplied by this "
                                          "(0.1 maps a 0-10 judge to 0-1)")
    max_tokens: int = field_(16, ge=1, help="openai: the judge's reply length")
    temperature: float = field_(0.0, ge=0, help="openai: the judge's sampling temperature")
    extra_body: Dict[str, Any] = field_(default_factory=dict, help="openai: merged into each "
                                        "request, e.g. {structured_outputs: {choice: ['0', '1']}} "
                                        "for vLLM")
    batch_size: int = field_(32, ge=1, help="json: responses per POST")
    concurrency: int = field_(16, ge=1, help="calls in flight at once, per engine (a judge "
                                             "answers one response a call)")
    timeout_s: float = field_(60.0, gt=0, help="seconds a call may take before it counts as failed")
    retries: int = field_(3, ge=0, help="retries of a call that timed out, could not connect or "
                                        "got 408/429/5xx, with exponential backoff")
    backoff_s: float = field_(1.0, ge=0, help="the first retry's wait; doubled each retry")
    on_failure: str = field_("skip_group", choices=("skip_group", "stop"),
                             help="skip_group: a group with an unscored response is not trained "
                                  "on (counted in reward/groups_skipped), and the run stops after "
                                  "max_consecutive_failures failed calls in a row; stop: the "
                                  "first failed call stops the run (exit 69, checkpoints kept)")
    max_consecutive_failures: int = field_(3, ge=1, help="failed calls in a row (after retries) "
                                           "that stop the run")
    api_key_env: str = field_("", help="an environment variable holding a bearer token "
                                       "(never the key itself in a recipe)")

    def settings(self):
        """The plain values ``rewards.http.HttpReward`` takes."""
        return HttpSettings(**{**asdict(self), "extra_body": dict(self.extra_body)})

    def check(self, prefix: str) -> None:
        """``ConfigError`` for a URL, template or regex that cannot work."""
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"{prefix}.url: must be an http:// or https:// URL of the reward "
                              f"service; got {self.url!r}")
        if self.protocol == "openai":
            if not self.model:
                raise ConfigError(f"{prefix}.model: the judge's served model name is needed with "
                                  "protocol: openai (what its /v1/models lists)")
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f is not None}
            except ValueError as e:
                raise ConfigError(f"{prefix}.prompt_template: {e} (a literal brace is doubled: "
                                  "{{ }})") from None
            unknown = fields - {"prompt", "response", "label"}
            if unknown or "response" not in fields:
                raise ConfigError(f"{prefix}.prompt_template: takes {{prompt}}, {{response}} and "
                                  f"{{label}} and must contain {{response}}; got fields "
                                  f"{sorted(fields)}")
            try:
                re.compile(self.score_regex)
            except re.error as e:
                raise ConfigError(f"{prefix}.score_regex: {e}") from None
        if self.api_key_env and self.api_key_env not in os.environ:
            raise ConfigError(f"{prefix}.api_key_env: the environment variable "
                              f"{self.api_key_env!r} is not set")


@dataclass
class RewardModelConfig:
    """``reward.model``: the learned reward model ``reward.name: model`` (or a component named
    ``model``) scores with, sharded like the policy on the trainer ranks (docs/rollout.md)."""
    path: str = field_("", help="a Hugging Face *ForSequenceClassification directory (config.json, "
                               "safetensors, tokenizer) of an architecture model.hf_config "
                               "imports (Qwen2, Qwen3, Qwen3-MoE, Mixtral, DeepSeek-V3), one "
                               "label; or tiny:digit_score, "
                               "the CPU demo's (rewards/tiny_rm.py, made under train.output_dir)")
    use_chat_template: bool = field_(True, help="score the conversation through the reward "
                                     "model's own chat template (when its tokenizer has one); "
                                     "false: its tokenizer on prompt + response text")
    normalize: str = field_("none", choices=("none", "running"),
                            help="running: scores minus the running mean over the running std of "
                                 "every score so far (kept in checkpoints)")
    clip: float = field_(0.0, ge=0, help="scores (after normalisation) clipped to [-clip, clip]; "
                                         "0: no clip")
    micro_batch_tokens: int = field_(8192, ge=1, help="tokens per forward micro-batch (each "
                                     "data-parallel rank scores its share)")
    offload: bool = field_(False, help="GPU: keep the reward model's weights in host memory "
                                       "between scorings (frees GPU memory for training)")

    def check(self, prefix: str) -> None:
        """``ConfigError`` for a missing directory or a config that is not a one-label
        sequence classifier (the weights are checked when they load)."""
        from pathlib import Path

        from megatron_rl.checkpoint.hf_mapping import num_labels, SEQUENCE_CLASSIFIER
        from megatron_rl.model.hf_config import read_config_json

        if not self.path:
            raise ConfigError(f"{prefix}.path: required with a reward named {MODEL_REWARD!r}: a "
                              "Hugging Face *ForSequenceClassification directory")
        if self.path == TINY_RM:
            return
        if not (Path(self.path) / "config.json").is_file():
            raise ConfigError(f"{prefix}.path: {self.path} has no config.json (give the reward "
                              "model's Hugging Face directory)")
        try:
            raw = read_config_json(self.path)
        except ValueError as e:
            raise ConfigError(f"{prefix}.path: {str(e).split(': ', 1)[-1]}") from None
        archs = raw.get("architectures") or []
        if len(archs) != 1 or not str(archs[0]).endswith(SEQUENCE_CLASSIFIER):
            raise ConfigError(f"{prefix}.path: architectures {archs} in {self.path}/config.json; "
                              f"a reward model is one *{SEQUENCE_CLASSIFIER}")
        if num_labels(raw) != 1:
            raise ConfigError(f"{prefix}.path: {self.path}/config.json has {num_labels(raw)} labels "
                              "(id2label / num_labels); a reward model scores with one")


@dataclass
class RewardConfig:
    """The ``reward`` section: the reward function (or components), its parameters and failure
    policy."""
    name: str = field_("exact_match", help="a built-in reward, or your own: path/to/file.py:fn "
                                           "or package.module:fn (rewards/user.py: our signature "
                                           "or verl's compute_score)")
    params: Dict[str, Any] = field_(default_factory=dict, help="keyword arguments of the reward, "
                                    "checked against its signature at load")
    failure_score: float = field_(0.0, help="score of a response whose reward raised")
    workers: int = field_(1, ge=1, help="threads scoring responses (sandboxed code rewards)")
    components: List[RewardComponentConfig] = field_(
        default_factory=list, help="a weighted sum of rewards instead of reward.name, e.g. "
        "[{name: math_verify, weight: 1.0}, {name: format, weight: 0.2}]; each part is logged as "
        "reward/<name>/mean")
    http: HttpRewardConfig = field_(default_factory=HttpRewardConfig,
                                    help="the service reward.name: http calls (rewards/http.py)")
    model: RewardModelConfig = field_(default_factory=RewardModelConfig,
                                      help="the learned reward model reward.name: model scores "
                                           "with (train/reward_model.py)")
    model_path: str = field_("", help="shorthand for reward.model.path")

    def names(self) -> List[str]:
        """The reward names in use: ``name``, or every component's."""
        return [c.name for c in self.components] if self.components else [self.name]

    def uses_model(self) -> bool:
        """Whether the learned reward model (``reward.model``) scores the responses."""
        return MODEL_REWARD in self.names()

    def model_weight(self) -> float:
        """The learned reward model's weight in the reward (1 when it is ``reward.name``)."""
        if not self.components:
            return 1.0
        return sum(float(c.weight) for c in self.components if c.name == MODEL_REWARD)

    def uses_service(self) -> bool:
        """Whether a reward service (``reward.http``) scores the responses."""
        return any(n in SERVICE_REWARDS for n in self.names())

    def component_list(self) -> List[Any]:
        """``rewards.Component`` s of ``components``, each labelled by its name (a user
        reward's function name), numbered when names repeat."""
        labels = [c.name.rpartition(":")[2] for c in self.components]
        out = []
        for i, (c, lab) in enumerate(zip(self.components, labels)):
            if labels.count(lab) > 1:
                lab = f"{lab}{labels[:i].count(lab)}"
            out.append(Component(c.name, float(c.weight), dict(c.params), lab))
        return out

    def check(self, prefix: str = "reward") -> None:
        """``ConfigError`` for an unknown reward or parameters it does not take."""
        if self.uses_service():
            self.http.check(f"{prefix}.http")
        if self.model_path:
            if self.model.path and self.model.path != self.model_path:
                raise ConfigError(f"{prefix}.model_path: {self.model_path!r} and {prefix}.model.path="
                                  f"{self.model.path!r} differ; set one of them")
            self.model.path = self.model_path
        if self.uses_model():
            self.model.check(f"{prefix}.model")
        if not self.components:
            _check_one(self.name, self.params, prefix)
            return
        if self.params:
            raise ConfigError(f"{prefix}.params: set with {prefix}.components, which replace "
                              f"{prefix}.name; give each component its own params")
        for i, c in enumerate(self.components):
            _check_one(c.name, c.params, f"{prefix}.components[{i}]")
        for name in SERVICE_REWARDS + (MODEL_REWARD,):
            if self.names().count(name) > 1:
                raise ConfigError(f"{prefix}.components: {name!r} appears more than once; one "
                                  f"service ({prefix}.{name}) scores a run, give it one weight")


def _check_one(name: str, params: Dict[str, Any], prefix: str) -> None:
    if name in SERVICE_REWARDS + (MODEL_REWARD,):
        if params:
            raise ConfigError(f"{prefix}.params: the {name} reward takes its settings from "
                              f"reward.{name}, not params; got {sorted(params)}")
        return
    try:
        fn = register_user_reward(name) if is_user_reward(name) else REWARDS.get_fn(name)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{prefix}.name: {e}") from None
    try:
        check_params("reward", name, params, keyword_params(fn, skip=("prompt", "metadata")))
    except TypeError as e:
        raise ConfigError(f"{prefix}.params: {e}") from None
