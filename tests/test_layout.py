"""Which code may import which: bench/ stands on its own, without tests/ (what both need is in harness/)."""

from __future__ import annotations

import ast
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
