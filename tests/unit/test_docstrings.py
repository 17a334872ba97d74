"""Every public function, class and method in ``megatron_rl/`` says what it is: at least 95% of
them carry a docstring (the house rule is all; the margin is for a new module's first commit)."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "megatron_rl"


def public_definitions(source: str):
    """``(qualified name, has a docstring)`` of the public defs at module and class level."""
    out = []

    def walk(node, prefix: str) -> None:
        for n in ast.iter_child_nodes(node):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if n.name.startswith("_"):
                    continue
                out.append((prefix + n.name, ast.get_docstring(n) is not None))
                if isinstance(n, ast.ClassDef):
                    walk(n, prefix + n.name + ".")

    walk(ast.parse(source), "")
    return out


def test_public_definitions_have_docstrings():
    defs = [(f"{p.relative_to(PACKAGE)}:{name}", ok) for p in sorted(PACKAGE.rglob("*.py"))
            for name, ok in public_definitions(p.read_text())]
    bare = [name for name, ok in defs if not ok]
    assert len(defs) > 400
    assert len(bare) <= 0.05 * len(defs), f"{len(bare)} of {len(defs)} without a docstring: {bare}"


def test_the_check_sees_methods_and_skips_private_names():
    src = ('class A:\n    """a"""\n    def f(self):\n        pass\n    def _g(self):\n        pass\n'
           'def h():\n    """h"""\n')
    assert public_definitions(src) == [("A", True), ("A.f", False), ("h", True)]
