"""Every import arrow points down: the layers below the operator never import it, and the
driver side never imports the function server (they share only `rlhfless.api`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rlhfless"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def offenders(packages: tuple[str, ...], forbidden: str) -> list[str]:
    out = []
    for package in packages:
        for path in sorted((PACKAGE / package).rglob("*.py")):
            bad = sorted(m for m in imported_modules(path)
                         if m == forbidden or m.startswith(forbidden + "."))
            out += [f"{path.relative_to(PACKAGE.parent)} imports {m}" for m in bad]
    return out


@pytest.mark.parametrize("forbidden,packages", [
    ("rlhfless.operator", ("runtime", "knative", "driver")),
    ("rlhfless.functions", ("driver", "runtime", "knative")),
])
def test_imports_point_down(forbidden: str, packages: tuple[str, ...]) -> None:
    assert offenders(packages, forbidden) == []


def test_cost_accounting_is_pure() -> None:
    """rlhfless.cost is numbers in, numbers out: the driver and the operator call it, never
    the other way round, and it touches no runtime, cluster or function server."""
    for forbidden in ("rlhfless.driver", "rlhfless.operator", "rlhfless.runtime",
                      "rlhfless.knative", "rlhfless.functions", "rlhfless.report"):
        assert offenders(("cost",), forbidden) == [], forbidden


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from rlhfless.operator.config import Hooks\n")
    assert "rlhfless.operator.config" in imported_modules(source)
