"""Built-in tool environments: the policy calls a tool (its result comes back as an observation)
or gives its final answer (scored by the run's ``reward`` section; the episode ends).

    calculator   <calc>2 * (3 + 4)</calc>       -> <result>14</result>
    python       ```python\\nprint(6 * 7)\\n```   -> <output>\\n42\\n</output>  (rewards.sandbox)
    lookup       call                            -> result <value> =   (synthetic:lookup)

``lookup`` is the CPU demo: the answer of a ``synthetic:lookup`` row is a digit hashed from its
key, which no model can compute, so only a policy that calls the tool and copies its result scores
above chance; the tiny MoE learns that in a few hundred steps (configs/recipes/tiny_moe_tool.yaml).
"""

from __future__ import annotations

import ast
import math
import operator
import re
from typing import Optional, Tuple

from megatron_rl.data.synthetic import lookup_value
from megatron_rl.envs.base import ENVIRONMENTS, Environment, StepResult
from megatron_rl.rewards.sandbox import SandboxLimits, run_untrusted


class ToolEnv(Environment):
    """An action that contains a tool call gets the tool's output as the next observation; any
    other action is the final answer. More than ``max_tool_calls`` calls end the episode
    unanswered (reward 0). ``call_bonus`` (default 0) is paid once, for the episode's first tool
    call that runs without error: the format shaping tool-use recipes add while a policy has
    yet to discover the tool (the answer reward is ``reward - call_bonus * env/tool_calls``)."""

    def __init__(self, *, score=None, max_tool_calls: int = 4, call_bonus: float = 0.0):
        super().__init__(score=score)
        if max_tool_calls < 1:
            raise ValueError(f"max_tool_calls must be >= 1, got {max_tool_calls}")
        self.max_tool_calls, self.call_bonus = max_tool_calls, float(call_bonus)
        self.calls, self.paid = 0, False

    def parse_call(self, action: str) -> Optional[str]:
        """The call's argument, or None when ``action`` is a final answer."""
        raise NotImplementedError

    def run_tool(self, arg: str) -> Tuple[str, bool]:
        """``(observation text, failed)``."""
        raise NotImplementedError

    def step(self, action: str) -> StepResult:
        """Run the tool call in ``action`` and return its output as the observation; an action
        without a call ends the episode, scored; calls beyond the limit end it as a tool error."""
        arg = self.parse_call(action)
        if arg is None:
            return StepResult(reward=float(self.score(action)) if self.score else 0.0, done=True)
        self.calls += 1
        if self.calls > self.max_tool_calls:
            return StepResult(done=True, tool_call=True, tool_error=True)
        text, failed = self.run_tool(arg)
        bonus = self.call_bonus if not (failed or self.paid) else 0.0
        self.paid = self.paid or not failed
        return StepResult(observation=text, reward=bonus, tool_call=True, tool_error=failed)


# ---- calculator --------------------------------------------------------------------------
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def arithmetic(expr: str, max_exponent: int = 64, max_abs: float = 1e30) -> float:
    """Value of an arithmetic expression (numbers, + - * / // % **, parentheses) without
    ``eval``; ``ValueError`` for anything else or a result out of range."""
    def ev(node):
        """The value of one AST node; ``ValueError`` for anything not arithmetic."""
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(b) > max_exponent:
                raise ValueError(f"exponent {b} is too large")
            out = _OPS[type(node.op)](a, b)
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            out = _OPS[type(node.op)](ev(node.operand))
        else:
            raise ValueError(f"unsupported expression element {type(node).__name__}")
        if isinstance(out, complex) or abs(out) > max_abs:
            raise ValueError("result out of range")
        return out

    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an expression: {e.msg}") from None
    return ev(tree.body)


def _format_number(x) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x) if isinstance(x, float) else str(x)


@ENVIRONMENTS.register("calculator")
class Calculator(ToolEnv):
    """A tool environment whose tool evaluates ``<calc>expression</calc>`` arithmetic."""
    CALL = re.compile(r"<calc>(.*?)</calc>", re.S)

    def parse_call(self, action):
        """The expression inside the first ``<calc>`` tag, or None."""
        m = self.CALL.search(action)
        return m.group(1) if m else None

    def run_tool(self, arg):
        """The expression's value as ``<result>``, or the error as the result."""
        try:
            return f"<result>{_format_number(arithmetic(arg))}</result>", False
        except (ValueError, ZeroDivisionError, OverflowError) as e:
            return f"<error>{e}</error>", True


# ---- python in the sandbox ------------------------------------------------------------------
@ENVIRONMENTS.register("python")
class PythonTool(ToolEnv):
    """Runs the action's fenced python block in ``rewards.sandbox`` (no network, own filesystem,
    CPU/memory/wall limits); stdout (and the tail of stderr on failure) is the observation."""

    CALL = re.compile(r"```python\n(.*?)```", re.S)

    def __init__(self, *, score=None, max_tool_calls: int = 4, call_bonus: float = 0.0,
                 timeout_s: float = 5.0, max_output_chars: int = 2000):
        super().__init__(score=score, max_tool_calls=max_tool_calls, call_bonus=call_bonus)
        self.timeout_s, self.max_output_chars = timeout_s, max_output_chars

    def parse_call(self, action):
        """The code inside the first ``<python>`` tag, or None."""
        m = self.CALL.search(action)
        return m.group(1) if m else None

    def run_tool(self, arg):
        """Run the code in the sandbox; its output (or failure) as the observation."""
        limits = SandboxLimits(wall_s=self.timeout_s, cpu_s=max(1, math.ceil(self.timeout_s)))
        r = run_untrusted(arg, limits=limits)
        text = r.stdout if r.ok else f"{r.stdout}{r.stderr[-500:]}\n[{r.reason()}]"
        return f"<output>\n{text[:self.max_output_chars]}</output>", not r.ok


# ---- the synthetic lookup task ----------------------------------------------------------------
@ENVIRONMENTS.register("lookup")
class Lookup(ToolEnv):
    """``call`` returns ``result <value> =`` for the row's key from the hidden table of
    ``data.synthetic.lookup_value``; with ``keyed`` the words after ``call`` are the key looked
    up (the policy must also copy the key)."""

    def __init__(self, *, score=None, max_tool_calls: int = 4, call_bonus: float = 0.0,
                 keyed: bool = False):
        super().__init__(score=score, max_tool_calls=max_tool_calls, call_bonus=call_bonus)
        self.keyed = keyed

    def parse_call(self, action):
        """The key after ``call`` (``keyed``), ``""`` for a bare ``call``, or None when the action
        makes no call."""
        words = action.split()
        if not words or words[0] != "call":
            return None
        return " ".join(words[1:]) if self.keyed else ""

    def run_tool(self, arg):
        """``result <value> =`` for the row's key from the hidden table; a failed lookup as the
        result."""
        meta = self.row.metadata or {}
        if "key" not in meta:
            return "result =", True
        key = arg or meta["key"]
        return f"result {lookup_value(key, meta.get('salt', 0), meta.get('value_len', 1))} =", False
