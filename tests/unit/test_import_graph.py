"""The import graph shows the structure: between the packages of ``megatron_rl`` (``algo``,
``train``, ..., and each top-level module) the imports form no cycle, and no two modules import
each other. Function-local imports count: they hide a dependency, they do not remove it."""

from __future__ import annotations

import ast
import collections
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "megatron_rl"


def _module(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_edges(root: pathlib.Path) -> dict:
    """module -> the package modules it imports (``from a import b`` names ``a.b`` when that is a
    module), anywhere in its body."""
    files = {_module(p, root): p for p in root.rglob("*.py")}
    edges = collections.defaultdict(set)
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(root.name):
                subs = {f"{node.module}.{a.name}" for a in node.names} & files.keys()
                edges[mod] |= subs or {node.module}
            elif isinstance(node, ast.Import):
                edges[mod] |= {a.name for a in node.names if a.name.startswith(root.name)}
    return edges


def package_cycles(edges: dict) -> list:
    """The cycles between packages (a package: the first two dotted parts), as sorted groups."""
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    graph = collections.defaultdict(set)
    for a, targets in edges.items():
        graph[top(a)] |= {top(b) for b in targets} - {top(a)}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reached = {n: reach(n) for n in list(graph)}
    groups = {tuple(sorted(m for m in reached if m in reached[n] and n in reached.get(m, ())))
              for n in reached}
    return sorted(g for g in groups if len(g) > 1)


def mutual_imports(edges: dict) -> list:
    return sorted({tuple(sorted((a, b))) for a, bs in edges.items() for b in bs
                   if a != b and a in edges.get(b, ())})


def test_packages_import_each_other_in_one_direction_only():
    edges = import_edges(PACKAGE)
    assert len(edges) > 50
    assert package_cycles(edges) == []
    assert mutual_imports(edges) == []


def test_the_check_finds_a_cycle_through_a_function_local_import(tmp_path):
    pkg = tmp_path / "megatron_rl"
    for sub in ("a", "b", "c"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from megatron_rl.b import y\n")
    (pkg / "b" / "y.py").write_text("from megatron_rl.c.z import f\n")
    (pkg / "c" / "z.py").write_text("def f():\n    from megatron_rl.a import x\n")
    edges = import_edges(pkg)
    assert package_cycles(edges) == [("megatron_rl.a", "megatron_rl.b", "megatron_rl.c")]
    (pkg / "c" / "z.py").write_text("def f():\n    pass\n")
    assert package_cycles(import_edges(pkg)) == []
