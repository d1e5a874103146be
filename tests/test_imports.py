"""No import cycle inside ``kd_experiments``, function-level imports included.

Every module is parsed with :mod:`ast` (nothing is imported), every ``import`` and
``from ... import`` statement anywhere in it (module level, inside functions or
classes, under ``if``/``try``) becomes an edge to the ``kd_experiments`` module it
names, and the graph is searched for cycles. ``from package import name`` points at
``package.name`` when that is a module, else at ``package`` (its ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

from kd_experiments.config import PROJECT_ROOT

PACKAGE = "kd_experiments"


def module_files(root: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of ``package`` under ``root``."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, from the source alone."""
    modules = module_files(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}

    def resolve(name: str) -> str | None:
        while name and name not in modules:  # an attribute of a module: its module
            name = name.rpartition(".")[0]
        return name or None

    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's own package upwards
                    base = name.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" for alias in node.names]
                targets = [t if t in modules else source for t in targets]
            for target in targets:
                if target == package or target.startswith(package + "."):
                    resolved = resolve(target)
                    if resolved is not None and resolved != name:
                        graph[name].add(resolved)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path ``a -> ... -> a``) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm (graphs here are small)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles = []
    for component in components:  # a path through the component back to its start
        members, start = set(component), min(component)
        path, seen = [start], {start}
        while True:
            successors = sorted(graph[path[-1]] & members)
            if start in successors and len(path) > 1:
                cycles.append([*path, start])
                break
            following = next((s for s in successors if s not in seen), None)
            if following is None:  # the start is reachable: back off to a cycle at a revisited node
                following = successors[0]
                cycles.append([*path[path.index(following):], following])
                break
            path.append(following)
            seen.add(following)
    return cycles


def test_kd_experiments_has_no_import_cycle() -> None:
    graph = import_graph(PROJECT_ROOT, PACKAGE)
    assert len(graph) > 20 and any(graph.values()), "the package was not found or parsed"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_check_finds_function_level_and_relative_cycles(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .a import thing\n")
    (package / "sub" / "a.py").write_text("def thing():\n    from pkg.b import other\n    return other\n")
    (package / "b.py").write_text("import os\nfrom pkg.sub import a\nother = 1\n")
    (package / "c.py").write_text("from . import b\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub"] == {"pkg.sub.a"}
    assert graph["pkg.c"] == {"pkg.b"}
    assert find_cycles(graph) == [["pkg.b", "pkg.sub.a", "pkg.b"]]
    (package / "b.py").write_text("other = 1\n")
    assert find_cycles(import_graph(tmp_path, "pkg")) == []


def test_tools_that_never_train_start_without_torch_or_lightning() -> None:
    """kd-report, and a sweep's own process (kd_experiments.train: the jobs train, not it), load
    neither torch nor Lightning: both start in well under a second instead of ten."""
    import subprocess
    import sys

    code = ("import sys, kd_experiments.report, kd_experiments.train, kd_experiments.tracking\n"
            "print(sorted(m for m in ('torch', 'lightning', 'torchvision') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]", result.stdout
