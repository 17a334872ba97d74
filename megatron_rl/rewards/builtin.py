"""Built-in rewards: exact match, math answer equivalence, format, and sandboxed code tests."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any, Optional

from megatron_rl.rewards.base import REWARDS
from megatron_rl.rewards.sandbox import ISOLATION_FAILED, SandboxLimits, run_untrusted


@REWARDS.register("exact_match")
def exact_match(response: str, label: Any, *, prompt: str = "", metadata=None,
                ignore_case: bool = False, strip: bool = True) -> float:
    """1 when the response equals the label (stripped, optionally ignoring case), else 0."""
    a, b = str(response), str(label)
    if strip:
        a, b = a.strip(), b.strip()
    if ignore_case:
        a, b = a.lower(), b.lower()
    return float(a == b)


@REWARDS.register("word_match")
def word_match(response: str, label: Any, *, prompt: str = "", metadata=None) -> float:
    """Partial credit: the share of positions where the response's whitespace-separated words
    equal the label's, over the longer of the two (extra or missing words cost). 1.0 only for an
    exact match; a random response scores near 1/vocabulary, so the signal is dense enough for a
    small random-init model to learn the synthetic tasks."""
    got, want = str(response).split(), str(label).split()
    if not want and not got:
        return 1.0
    hits = sum(a == b for a, b in zip(got, want))
    return hits / max(len(got), len(want))


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (nested braces balanced), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


def _normalise(ans: str) -> str:
    s = ans.strip().strip("$").strip()
    s = re.sub(r"\\(left|right|,|!|;|:)", "", s)
    s = re.sub(r"\\(d|t)?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\2)/(\3)", s)
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("^\\circ", "").replace("%", "")
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    return re.sub(r"\s+", "", s).rstrip(".")


def _as_number(s: str) -> Optional[float]:
    t = s.replace(",", "")
    m = re.fullmatch(r"\(?(-?[\d.]+)\)?/\(?(-?[\d.]+)\)?", t)
    try:
        if m:
            return float(Fraction(m[1]) / Fraction(m[2]))
        return float(t)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(response: str) -> Optional[str]:
    """The last boxed answer, else the last number in the response."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    nums = _NUMBER.findall(response)
    return nums[-1] if nums else None


@REWARDS.register("math")
def math_equivalence(response: str, label: Any, *, prompt: str = "", metadata=None,
                     rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> float:
    """1 when the response's final answer equals ``label``: numerically (fractions, commas,
    ``\\frac``) within tolerance, else as normalised LaTeX strings."""
    got = extract_answer(str(response))
    if got is None:
        return 0.0
    a, b = _normalise(got), _normalise(str(label))
    x, y = _as_number(a), _as_number(b)
    if x is not None and y is not None:
        return float(math.isclose(x, y, rel_tol=rel_tol, abs_tol=abs_tol))
    return float(a == b)


@REWARDS.register("math_verify")
def math_verify(response: str, label: Any, *, prompt: str = "", metadata=None,
                timeout_s: int = 5) -> float:
    """1 when the response's answer is mathematically equal to ``label``, by Hugging Face's
    ``math-verify`` (as verl's and TRL's math rewards): the gold answer is read as LaTeX (boxed),
    the response as an expression or LaTeX, then compared symbolically. ``\\dfrac`` vs
    ``\\frac``, ``x=3`` vs ``3``, ``10\\%`` vs ``10`` and ``\\text{(B)}`` vs ``B`` are equal
    here, where ``math`` scores them 0. Its time limits are signal alarms, which only the main
    thread can set: with ``reward.workers > 1`` they are off."""
    try:
        from math_verify import parse, verify
        from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig
    except ImportError:
        raise RuntimeError("the math_verify reward needs the math-verify package "
                           "(pip install math-verify)") from None
    import threading

    limit = timeout_s if threading.current_thread() is threading.main_thread() else None
    gold = parse("\\boxed{" + str(label) + "}", extraction_config=[LatexExtractionConfig()],
                 parsing_timeout=limit)
    got = parse(str(response), extraction_config=[ExprExtractionConfig(), LatexExtractionConfig()],
                parsing_timeout=limit)
    return float(bool(gold) and bool(got) and verify(gold, got, timeout_seconds=limit))


@REWARDS.register("format")
def format_reward(response: str, label: Any = None, *, prompt: str = "", metadata=None,
                  pattern: str = r"^<think>.*?</think>\s*<answer>.*?</answer>\s*$") -> float:
    """1 when the whole response matches ``pattern`` (regex, DOTALL)."""
    return float(re.match(pattern, str(response), flags=re.DOTALL) is not None)


_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


@REWARDS.register("code")
def code_tests(response: str, label: Any, *, prompt: str = "", metadata=None,
               wall_s: float = 10.0, cpu_s: int = 5, memory_mb: int = 512) -> float:
    """Run the response's last fenced Python block followed by the tests in ``label`` (Python
    source with asserts) in the sandbox: 1 when it exits cleanly, 0 when a test fails or the
    program is killed at a limit. A sandbox that cannot confine it raises (``score`` records it)."""
    blocks = _FENCE.findall(str(response))
    code = blocks[-1] if blocks else str(response)
    result = run_untrusted(code + "\n\n" + str(label) + "\n",
                           limits=SandboxLimits(wall_s=wall_s, cpu_s=cpu_s, memory_mb=memory_mb))
    if result.returncode == ISOLATION_FAILED:
        raise RuntimeError(f"code reward: {result.reason()}")
    return float(result.ok)
