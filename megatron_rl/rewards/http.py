"""Rewards from a service over HTTP (``reward.name: http``): a plain JSON reward service, or an
LLM judge behind an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, TGI, OpenAI).

Protocols (``protocol``):
- ``json``: ``POST url`` with ``{"items": [{"prompt", "response", "label", "metadata"}, ...]}``
  (up to ``batch_size`` items a call); the answer is ``{"scores": [s, ...]}`` (or a bare list),
  one number (or ``{"score": number}``) per item, in order. ``megatron_rl.rewards.service`` serves
  any registered or user reward this way.
- ``openai``: one ``POST url/chat/completions`` per response with the judge prompt (the
  ``prompt_template`` filled with ``{prompt}``, ``{response}``, ``{label}``), ``temperature``,
  ``max_tokens`` and ``extra_body`` merged in (e.g. vLLM's ``structured_outputs``); the score is
  the first match of ``score_regex`` in the reply (its first group if it has one) times
  ``score_scale``.

Failures: a call that times out, cannot connect, or gets 408 / 429 / 5xx is retried ``retries``
times with exponential backoff (``backoff_s`` doubled each time, jittered); any other error (a
4xx, an answer that does not parse, a judge reply with no score) is not. An item whose call failed
has no score: its group is skipped (``on_failure: skip_group``) and counted, never scored zero.
``ServiceDown`` is raised once ``max_consecutive_failures`` calls in a row failed (``on_failure:
stop``: the first), naming the URL and the last error.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from megatron_rl.rewards import RewardResult

RETRY_STATUS = (408, 429, 500, 502, 503, 504)
EXIT_UNAVAILABLE = 69   # EX_UNAVAILABLE: the reward service is down; rerun once it is back


class ServiceDown(RuntimeError):
    """Too many calls in a row to the reward service failed: the run stops (one line)."""


@dataclass(frozen=True)
class Item:
    """One response to score: what the service is sent."""
    prompt: Any
    response: str
    label: Any = None
    metadata: Optional[Dict[str, Any]] = None


@dataclass
class CallStats:
    """Counts of one scoring pass (summed over engines, logged as ``reward/http_*``)."""
    calls: int = 0
    failed_calls: int = 0
    retries: int = 0
    latency_s: float = 0.0       # summed over the calls that answered
    answered: int = 0

    def as_dict(self) -> Dict[str, float]:
        """Plain sums, for the rollouts' metrics."""
        return {"http_calls": float(self.calls), "http_failed_calls": float(self.failed_calls),
                "http_retries": float(self.retries), "http_latency_sum_s": self.latency_s,
                "http_answered": float(self.answered)}


@dataclass(frozen=True)
class HttpSettings:
    """The ``reward.http`` section as plain values (``config.HttpRewardConfig.settings``)."""
    url: str
    protocol: str = "json"
    model: str = ""
    prompt_template: str = ""
    system_prompt: str = ""
    score_regex: str = r"-?\d+(?:\.\d+)?"
    score_scale: float = 1.0
    max_tokens: int = 16
    temperature: float = 0.0
    extra_body: Dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    concurrency: int = 16
    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 1.0
    on_failure: str = "skip_group"
    max_consecutive_failures: int = 3
    api_key_env: str = ""


class _CallFailed(Exception):
    """One call's final failure (after its retries); ``retry`` says whether it may be retried."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


class HttpReward:
    """A client of one reward service: ``score(items)`` -> one ``RewardResult`` per item
    (``score`` None: unscored, why in ``error``)."""

    def __init__(self, s: HttpSettings):
        self.s = s
        self.endpoint = s.url
        if s.protocol == "openai" and not s.url.rstrip("/").endswith("/chat/completions"):
            self.endpoint = s.url.rstrip("/") + "/chat/completions"
        self.pattern = re.compile(s.score_regex)
        self.consecutive = 0               # failed calls since the last answered one
        self.last_error = ""
        self.stats = CallStats()
        self._lock = threading.Lock()
        self._jitter = random.Random()   # its own: a retry never moves the global random state

    # ---- the batch --------------------------------------------------------------------------
    def score(self, items: Sequence[Item]) -> List[RewardResult]:
        """Every item's outcome; ``ServiceDown`` once too many calls in a row failed."""
        if self.s.protocol == "json":
            calls = [list(range(a, min(a + self.s.batch_size, len(items))))
                     for a in range(0, len(items), self.s.batch_size)]
        else:
            calls = [[i] for i in range(len(items))]
        out: List[Optional[RewardResult]] = [None] * len(items)
        stop = threading.Event()

        def one(idx: List[int]) -> None:
            """One call's items scored (or all failed) into ``out``."""
            if stop.is_set():   # the service is down: the rest are not tried
                for i in idx:
                    out[i] = RewardResult(None, f"not sent: {self.last_error}")
                return
            for i, o in zip(idx, self._call([items[i] for i in idx])):
                out[i] = o
            if self._down():
                stop.set()

        with ThreadPoolExecutor(max(1, min(self.s.concurrency, len(calls) or 1))) as pool:
            list(pool.map(one, calls))
        if self._down():
            raise ServiceDown(f"reward.http: {self.endpoint}: {self.consecutive} call(s) in a row "
                              f"failed; last error: {self.last_error} (start the service, or "
                              "raise reward.http.max_consecutive_failures / retries)")
        return out  # type: ignore[return-value]

    def take_stats(self) -> Dict[str, float]:
        """This pass's counts, reset for the next."""
        with self._lock:
            stats, self.stats = self.stats, CallStats()
        return stats.as_dict()

    def _down(self) -> bool:
        limit = 1 if self.s.on_failure == "stop" else self.s.max_consecutive_failures
        return self.consecutive >= limit

    # ---- one call ---------------------------------------------------------------------------
    def _call(self, items: List[Item]) -> List[RewardResult]:
        """One request (with its retries) for ``items``; the counters updated."""
        body = self._body(items)
        error = ""
        for attempt in range(self.s.retries + 1):
            if attempt:
                with self._lock:
                    self.stats.retries += 1
                time.sleep(self.s.backoff_s * 2 ** (attempt - 1) * (0.5 + self._jitter.random() / 2))
            t0 = time.perf_counter()
            try:
                answer = self._post(body)
                outcomes = self._parse(answer, items)
            except _CallFailed as e:
                error = str(e)
                if e.retry:
                    continue
                break
            with self._lock:
                self.stats.calls += 1
                self.stats.answered += 1
                self.stats.latency_s += time.perf_counter() - t0
                self.consecutive = 0
            return outcomes
        with self._lock:
            self.stats.calls += 1
            self.stats.failed_calls += 1
            self.consecutive += 1
            self.last_error = error
        return [RewardResult(None, f"reward.http: {error}")] * len(items)

    def _post(self, body: dict) -> Any:
        """The decoded JSON answer; ``_CallFailed`` (retryable or not) otherwise."""
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.s.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.s.api_key_env, '')}"
        req = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.s.timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode("utf-8", "replace")
            raise _CallFailed(f"HTTP {e.code} {e.reason}: {detail}", e.code in RETRY_STATUS) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise _CallFailed(f"{type(reason).__name__}: {reason}", True) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise _CallFailed(f"the answer is not JSON: {raw[:100]!r}", False) from None

    # ---- the protocols ----------------------------------------------------------------------
    def _body(self, items: List[Item]) -> dict:
        if self.s.protocol == "json":
            return {"items": [{"prompt": it.prompt, "response": it.response, "label": it.label,
                               "metadata": it.metadata or {}} for it in items]}
        (it,) = items
        messages = [{"role": "system", "content": self.s.system_prompt}] if self.s.system_prompt else []
        messages.append({"role": "user", "content": judge_prompt(self.s.prompt_template, it)})
        return {"model": self.s.model, "messages": messages, "max_tokens": self.s.max_tokens,
                "temperature": self.s.temperature, **self.s.extra_body}

    def _parse(self, answer: Any, items: List[Item]) -> List[RewardResult]:
        if self.s.protocol == "json":
            return _json_scores(answer, len(items))
        try:
            reply = answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise _CallFailed(f"not a chat completion: {str(answer)[:100]}", False) from None
        m = self.pattern.search(reply)
        if m is None:
            return [RewardResult(None, f"reward.http: no score in the judge's reply {reply[:80]!r}")]
        value = float(m.group(1) if m.groups() else m.group(0)) * self.s.score_scale
        if not math.isfinite(value):
            return [RewardResult(None, f"reward.http: the judge's score is {value}")]
        return [RewardResult(value)]


def _json_scores(answer: Any, n: int) -> List[RewardResult]:
    """A JSON service's answer -> ``n`` outcomes; a wrong shape fails the call (not retried)."""
    scores = answer.get("scores") if isinstance(answer, dict) else answer
    if not isinstance(scores, list) or len(scores) != n:
        raise _CallFailed(f"expected {{\"scores\": [{n} numbers]}}, got {str(answer)[:100]}", False)
    out = []
    for s in scores:
        if isinstance(s, dict):
            s = s.get("score")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            out.append(RewardResult(None, f"reward.http: the service scored {s!r}"))
        else:
            out.append(RewardResult(float(s)))
    return out


def render_prompt(prompt: Any) -> str:
    """A prompt as text for a judge: a chat prompt as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" if isinstance(m, dict)
                         else str(m) for m in prompt)
    return str(prompt)


def judge_prompt(template: str, item: Item) -> str:
    """The judge's user message for ``item``."""
    return template.format(prompt=render_prompt(item.prompt), response=item.response,
                           label="" if item.label is None else str(item.label))
