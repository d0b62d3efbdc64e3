"""The package's shape: who imports whom, and where files are published.

The import graph counts every ``import`` statement in a module, at its top or inside a function:
a lazy import still ties two modules together for the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PKG = REPO / "maescale"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """maescale modules ``path`` imports (a name imported from a package counts as its module
    when it is one, else as the package)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("maescale"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("maescale"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != me}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _package_modules(graph: dict[str, set[str]], name: str) -> set[str]:
    return {m for m in graph if m == name or m.startswith(name + ".")}


def test_no_import_cycles():
    graph = _graph()
    # A package's __init__ re-exporting its own submodules is not a cycle between concerns.
    for pkg in [m for m, p in _modules().items() if p.name == "__init__.py"]:
        for sub in _package_modules(graph, pkg) - {pkg}:
            graph[sub] = graph[sub] - {pkg}
    assert _cycles(graph) == []


def test_core_imports_nothing_from_devtools():
    graph = _graph()
    dev = _package_modules(graph, "maescale.devtools")
    offenders = {m: sorted(graph[m] & dev) for m in graph if m not in dev and graph[m] & dev}
    assert offenders == {}


def test_launch_halves_meet_only_through_the_job_class():
    graph = _graph()
    assert "maescale.launch.submit" not in graph["maescale.launch.job"]
    assert not graph["maescale.launch.job"] & {"maescale.cli"}  # exit codes live in maescale.exitcodes


def test_torch_free_modules_stay_torch_free():
    """The login node, the job's supervisor and the shard tools import these without torch."""
    for name in ("rundir", "config/__init__", "config/schema", "config/load", "config/validate", "exitcodes", "cli",
                 "launch/submit", "launch/job", "launch/env", "launch/supervisor", "launch/task", "compat", "control",
                 "watchdog", "data/shards", "models/presets", "models/__init__"):
        tree = ast.parse((PKG / f"{name}.py").read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
        assert not {n for n in names if n.split(".")[0] in ("torch", "deepspeed", "numpy")}, name


def test_only_rundir_publishes_files():
    """Temp-file + rename is written once (maescale.rundir); everything else calls it."""
    users = sorted(str(p.relative_to(REPO)) for p in PKG.rglob("*.py") if "os.replace(" in p.read_text())
    assert users == ["maescale/rundir.py"]
