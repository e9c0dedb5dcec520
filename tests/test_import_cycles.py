"""No import cycle among the modules of ``src/nasforge``, function-level imports included.

The walk parses every module with ``ast`` (so an import inside a function counts as much as one at
the top), resolves ``from pkg import name`` to the submodule ``pkg.name`` when that file exists,
counts a package's ``__init__`` as the module of its folder, and finds strongly connected
components. The finder itself is checked against an independent test (Kahn's topological sort)
on random module graphs written as packages.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_graph(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: modules it imports}`` for every module of ``package`` under ``root``."""
    mods: dict[str, Path] = {}
    for f in (root / package).rglob("*.py"):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        base = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    b = base
                    for _ in range(node.level - 1):
                        b = b.rpartition(".")[0]
                    mod = f"{b}.{node.module}" if node.module else b
                names = [
                    f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names
                ]
            else:
                continue
            for name in names:
                if name.split(".")[0] == package:
                    target = resolve(name)
                    if target and target != m:
                        edges[m].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycle_in_nasforge():
    edges = module_graph(SRC, "nasforge")
    assert len(edges) > 50 and sum(map(len, edges.values())) > 100  # the walk found the code
    found = cycles(edges)
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def _has_cycle_kahn(edges: dict[str, set[str]]) -> bool:
    indegree = {m: 0 for m in edges}
    for targets in edges.values():
        for t in targets:
            indegree[t] += 1
    ready = [m for m, d in indegree.items() if d == 0]
    seen = 0
    while ready:
        m = ready.pop()
        seen += 1
        for t in edges[m]:
            indegree[t] -= 1
            if indegree[t] == 0:
                ready.append(t)
    return seen < len(edges)


def _write_package(root: Path, edges: dict[str, set[str]], rng: random.Random) -> None:
    """Modules ``pkg.mN`` importing each other as ``edges`` says, in every import spelling."""
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text("")
    for m, targets in edges.items():
        lines = []
        for t in sorted(targets):
            name = t.rpartition(".")[2]
            style = rng.randrange(4)
            if style == 0:
                lines.append(f"import {t}")
            elif style == 1:
                lines.append(f"from pkg import {name}")
            elif style == 2:
                lines.append(f"from .{name} import thing")
            else:  # only reached when called: the walk must still see it
                lines.append(f"def f_{name}():\n    from pkg.{name} import thing\n    return thing")
        lines.append("thing = 1")
        (root / "pkg" / f"{m.rpartition('.')[2]}.py").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("seed", range(40))
def test_cycle_finder_agrees_with_a_topological_sort(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    n = rng.randint(2, 9)
    names = [f"pkg.m{i}" for i in range(n)]
    density = rng.choice([0.1, 0.2, 0.35])
    edges = {a: {b for b in names if b != a and rng.random() < density} for a in names}
    _write_package(tmp_path, edges, rng)
    walked = module_graph(tmp_path, "pkg")
    assert {m: walked[m] for m in names} == edges
    found = cycles(walked)
    assert bool(found) == _has_cycle_kahn(edges)
    for comp in found:  # every module of a reported cycle reaches every other one
        for a in comp:
            reach, todo = set(), [a]
            while todo:
                for b in walked[todo.pop()]:
                    if b not in reach:
                        reach.add(b)
                        todo.append(b)
            assert set(comp) <= reach
