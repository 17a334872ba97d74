"""algo/ is pure tensor math: no distributed, Megatron or vLLM imports, no host syncs."""

import ast
import pathlib

import pytest

ALGO = pathlib.Path(__file__).resolve().parents[2] / "megatron_rl" / "algo"
FORBIDDEN_MODULES = ("torch.distributed", "megatron", "vllm", "transformer_engine", "apex")
HOST_SYNCS = ("item", "tolist", "numpy", "cpu", "nonzero", "unique")


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN_MODULES)


def violations(source: str):
    """Lines of ``source`` that import a forbidden module or call a host-syncing method."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Attribute) and node.attr == "distributed":
            names = ["torch.distributed"]
        found += [f"{node.lineno}: uses {n}" for n in names if _forbidden(n)]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in HOST_SYNCS:
                found.append(f"{node.lineno}: calls .{node.func.attr}()")
    return found


def _sources():
    files = sorted(ALGO.glob("*.py"))
    assert files, f"no sources found under {ALGO}"
    return files


@pytest.mark.parametrize("path", _sources(), ids=lambda p: p.name)
def test_algo_module_is_pure_math_without_host_syncs(path):
    assert violations(path.read_text()) == [], path.name


@pytest.mark.parametrize("src", [
    "import torch.distributed as dist", "from megatron.core import parallel_state",
    "import vllm", "x = torch.distributed.get_rank()", "y = loss.item()", "z = t.tolist()",
])
def test_purity_check_catches_each_kind_of_violation(src):
    assert violations(src)


def test_purity_check_allows_our_own_package():
    assert violations("from megatron_rl.algo.masked import seq_sum") == []
