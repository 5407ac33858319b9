"""Which code may import which: bench/ stands on its own, without tests/ (what both need is in harness/)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (imports inside functions count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_imported_modules_sees_nested_and_from_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import os\ndef f():\n    from tests.support import x\n    import tests\n")
    assert imported_modules(source) == {"os", "tests.support", "tests"}


def test_bench_imports_nothing_of_tests() -> None:
    files = sorted((ROOT / "bench").rglob("*.py"))
    assert files, "no bench/ sources found"
    offenders = {
        f"{path.relative_to(ROOT)}: {module}"
        for path in files
        for module in imported_modules(path)
        if module == "tests" or module.startswith("tests.")
    }
    assert not offenders, f"bench/ must not import tests/ (move what both need to harness/): {sorted(offenders)}"


PACKAGES = ("flows", "tasks", "deployments", "harness", "bench")


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (`from pkg import sub` counts as importing pkg.sub)."""
    modules = {module_name(root, p): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                edges.add(node.module)
                edges.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
        edges.discard(name)  # a flow's __main__ block loads its own module under its package name
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_circles_are_found_even_through_a_function_level_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.c import x\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from pkg.d import y\n")  # itself: not a circle
    assert circles(import_graph(tmp_path, ("pkg",))) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_the_house_has_no_import_circle() -> None:
    graph = import_graph(ROOT, PACKAGES)
    assert len(graph) > 40, "the project's modules were not found"
    assert circles(graph) == []


def test_tasks_import_no_flow_and_the_run_needs_no_prefect() -> None:
    """tasks/ is what flows are made of; tasks/run.py is the whole run without Prefect (tests, pre-flight)."""
    graph = import_graph(ROOT, PACKAGES)
    upward = sorted(
        f"{m} -> {d}" for m, deps in graph.items() if m.startswith("tasks") for d in deps if d.startswith("flows")
    )
    assert upward == []
    probe = "import sys, tasks.run; print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect')[:3])"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# Imports each module named on the command line in a forked child of an interpreter that has loaded the
# third-party packages only (seconds each, once), so every child meets the project's modules fresh.
IMPORT_EACH = """
import importlib, os, sys, traceback
import httpx, ollama, openai, polars, prefect, pydantic, yaml  # noqa: F401  third-party only
assert not [m for m in sys.modules if m.split(".")[0] in ("tasks", "flows", "deployments", "harness")]
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1]:
        failed.append(name)
print(failed)
"""


def test_every_module_imports_on_its_own() -> None:
    """Each module in an interpreter holding none of the project, as `python -m` would load it: an
    import order that only works after another module was loaded first fails here."""
    modules = sorted(import_graph(ROOT, ("flows", "tasks", "deployments", "harness")))
    done = subprocess.run([sys.executable, "-c", IMPORT_EACH, *modules], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stderr


def test_the_import_check_catches_a_module_that_needs_another_loaded_first(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "a.py").write_text("from tasks.b import B\nA = 1\n")
    (tmp_path / "tasks" / "b.py").write_text("from tasks.a import A\nB = 2\n")  # a circle: fails from either side
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH, "tasks.a", "tasks.b"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.stdout.strip() == "['tasks.a', 'tasks.b']"
