"""Every import arrow points down: the layers below the operator never import it, the
driver side never imports the function server (they share only `rlhfless.api`), and the
operator never imports what reads a job's data (models, the store, datasets, the driver)."""

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
        root = PACKAGE / package
        for path in sorted(root.rglob("*.py") if root.is_dir() else [root]):
            bad = sorted(m for m in imported_modules(path)
                         if m == forbidden or m.startswith(forbidden + "."))
            out += [f"{path.relative_to(PACKAGE.parent)} imports {m}" for m in bad]
    return out


@pytest.mark.parametrize("forbidden,packages", [
    ("rlhfless.operator", ("runtime", "knative", "driver", "driver_pod.py")),
    ("rlhfless.functions", ("driver", "runtime", "knative", "driver_pod.py")),
    # The operator holds cluster-wide rights: it never touches user data or models.
    *[(forbidden, ("operator",)) for forbidden in (
        "rlhfless.model", "rlhfless.store", "rlhfless.rewards", "rlhfless.driver",
        "rlhfless.driver_pod", "rlhfless.functions", "rlhfless.train", "rlhfless.runtime",
        "rlhfless.knative.runtime", "torch", "transformers")],
])
def test_imports_point_down(forbidden: str, packages: tuple[str, ...]) -> None:
    assert offenders(packages, forbidden) == []


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from rlhfless.operator.config import Hooks\n")
    assert "rlhfless.operator.config" in imported_modules(source)


def test_the_operator_process_never_imports_torch_or_a_model_loader() -> None:
    """What the operator runs (handlers, spec validation) loads no ML library at all."""
    import subprocess
    import sys

    code = ("import sys, rlhfless.operator.main, rlhfless.operator.handlers\n"
            "from rlhfless.api.spec import parse_spec\n"
            "parse_spec({'model': {'source': 'hf', 'path': '/x'}, 'reward': {'name': 'format'}},"
            " 'j')\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') or "
            "m.startswith(('rlhfless.model', 'rlhfless.store', 'rlhfless.driver'))]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]"
