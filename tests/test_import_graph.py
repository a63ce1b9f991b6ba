"""The import graph of the four packages: no circles, and each twin free of the other framework.

Every ``.py`` file of ``attn_spec/``, ``jax_attn/``, ``torch_attn/`` and ``compare/`` is parsed with
``ast`` (nothing is imported), and *every* import statement counts, also those inside functions: a lazy
import only postpones a circle to the first call.

How an import becomes an edge ``importer -> target`` (both modules of these packages):

- ``import a.b.c`` -> ``a.b.c`` (the longest prefix that is one of our modules);
- ``from a.b import x`` -> ``a.b.x`` when that module exists (``x`` is a submodule), else ``a.b``;
- relative imports are resolved against the importer's package first.

Importing ``pkg.sub`` also runs ``pkg/__init__.py``, but no edge ``pkg.sub -> pkg`` is added for that:
a package ``__init__`` that imports its own submodules (``pkg -> pkg.sub``) is the expected shape, and a
child importing a sibling is not a circle through its parent.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("attn_spec", "jax_attn", "torch_attn", "compare")
# Top-level names a package must never import (STYLE.md: the twins are framework-pure and never
# import each other; attn_spec imports no tensor library).
FORBIDDEN = {
    "jax_attn": {"torch", "transformers", "torch_attn"},
    "torch_attn": {"jax", "jaxlib", "flax", "optax", "jax_attn"},
    "attn_spec": {"torch", "transformers", "jax", "jaxlib", "flax", "jax_attn", "torch_attn"},
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """``{module name: (path, is_package)}`` for every file of :data:`PACKAGES`."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            out[_module_name(path, root)] = (path, path.name == "__init__.py")
    return out


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every module name ``tree`` imports, as written (``from a import b`` gives ``a.b`` and ``a``,
    resolved later), relative imports made absolute."""
    names = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names += [(base, alias.name) for alias in node.names]
    return names


def _resolve(base: str, attr: str | None, modules) -> str | None:
    """The one of our modules an import lands on, or None for a module outside the packages."""
    if attr is not None and attr != "*" and f"{base}.{attr}" in modules:
        return f"{base}.{attr}"
    parts = base.split(".")
    while parts:
        name = ".".join(parts)
        if name in modules:
            return name
        parts.pop()
    return None


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(edges, external)``: edges between our modules, and each module's top-level outside imports."""
    sources = _sources(root)
    edges = {m: set() for m in sources}
    external = {m: set() for m in sources}
    for module, (path, is_package) in sources.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for base, attr in _imports(tree, module, is_package):
            target = _resolve(base, attr, sources)
            if target is None:
                external[module].add(base.split(".")[0])
            elif target != module:
                edges[module].add(target)
    return edges, external


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (depth-first search, white/grey/black)."""
    state = dict.fromkeys(edges, 0)  # 0 unvisited, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n, 0) == 1:
                return [*stack[stack.index(n) :], n]
            if state.get(n, 0) == 0:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if state[m] == 0:
            found = visit(m)
            if found:
                return found
    return None


def test_the_graph_sees_every_package_and_lazy_imports():
    # The parser must be able to see what it is meant to forbid: a function-level import is an edge.
    edges, external = import_graph()
    assert {m.split(".")[0] for m in edges} == set(PACKAGES)
    assert "compare.vectors" in edges and "compare.registry" in edges["compare.vectors"]
    assert "jax" in external["compare.env"]  # imported inside pin_precision()


def test_find_cycle_reports_a_cycle_and_accepts_a_package_init():
    assert find_cycle({"a": {"a.x"}, "a.x": {"a.y"}, "a.y": set()}) is None
    assert find_cycle({"a": {"a.x"}, "a.x": {"a.y"}, "a.y": {"a.x"}}) == ["a.x", "a.y", "a.x"]
    two = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c", "e"}, "e": set()}
    assert cycles(two) == [["a", "b", "a"], ["c", "d", "c"]]


def test_relative_and_submodule_imports_resolve(tmp_path):
    (tmp_path / "compare" / "kinds").mkdir(parents=True)
    for pkg in PACKAGES[:-1]:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "compare" / "__init__.py").write_text("")
    (tmp_path / "compare" / "kinds" / "__init__.py").write_text("from . import base\n")
    (tmp_path / "compare" / "kinds" / "base.py").write_text("def f():\n    from ..vectors import load\n")
    (tmp_path / "compare" / "vectors.py").write_text("from compare import kinds\nimport numpy\n")
    edges, external = import_graph(tmp_path)
    assert edges["compare.kinds"] == {"compare.kinds.base"}
    assert edges["compare.kinds.base"] == {"compare.vectors"}
    assert edges["compare.vectors"] == {"compare.kinds"}
    assert external["compare.vectors"] == {"numpy"}
    assert find_cycle(edges) == ["compare.kinds", "compare.kinds.base", "compare.vectors", "compare.kinds"]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each circle of modules (each strongly connected component of two or more),
    so that a failure names every circle at once, not only the first."""
    remaining = dict(edges)
    found = []
    while (cycle := find_cycle(remaining)) is not None:
        found.append(cycle)
        # Everything that reaches and is reached from the cycle is one circle: drop it and look again.
        members = set(cycle)
        changed = True
        while changed:
            changed = False
            for m in list(remaining):
                if m not in members and remaining[m] & members and _reaches(remaining, members, m):
                    members.add(m)
                    changed = True
        remaining = {m: ts - members for m, ts in remaining.items() if m not in members}
    return found


def _reaches(edges: dict[str, set[str]], members: set[str], start: str) -> bool:
    """Whether some module of ``members`` leads back to ``start``."""
    seen, todo = set(), list(members)
    while todo:
        m = todo.pop()
        if m == start:
            return True
        if m not in seen:
            seen.add(m)
            todo += edges.get(m, ())
    return False


def test_no_import_cycles():
    edges, _ = import_graph()
    found = cycles(edges)
    assert not found, "import cycles (imports inside functions count):\n" + "\n".join(
        " -> ".join(c) for c in found
    )


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_framework_purity(package):
    edges, external = import_graph()
    bad = {
        m: sorted((external[m] | {t.split(".")[0] for t in edges[m]}) & FORBIDDEN[package])
        for m in external
        if m.split(".")[0] == package
    }
    bad = {m: names for m, names in bad.items() if names}
    assert not bad, f"{package} must not import {sorted(FORBIDDEN[package])}: {bad}"
