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


# The memory plan: arithmetic on a model's shape, which the operator checks at validation
# (`check_job(open_files=False)`: shapes known without files). Pure, no ML library.
PURE_MODEL = ("rlhfless.model.fit", "rlhfless.model.memory", "rlhfless.model.reward_config",
              "rlhfless.model.shape")


def _allowed(module: str, allowed: tuple[str, ...]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def offenders(packages: tuple[str, ...], forbidden: str,
              allowed: tuple[str, ...] = ()) -> list[str]:
    out = []
    for package in packages:
        root = PACKAGE / package
        for path in sorted(root.rglob("*.py") if root.is_dir() else [root]):
            bad = sorted(m for m in imported_modules(path)
                         if (m == forbidden or m.startswith(forbidden + "."))
                         and not _allowed(m, allowed))
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
    allowed = PURE_MODEL if packages == ("operator",) else ()
    assert offenders(packages, forbidden, allowed) == []


def test_the_memory_plan_the_operator_uses_is_pure() -> None:
    """What the operator may import of rlhfless.model loads no ML library and no loader
    (a local GGUF's header is found by the loader only with `open_files`, which the
    operator never passes: the subprocess test below checks what it loads)."""
    for module in PURE_MODEL:
        path = PACKAGE / (module.removeprefix("rlhfless.").replace(".", "/") + ".py")
        imports = {alias.name if isinstance(node, ast.Import) else f"{node.module}"
                   for node in ast.parse(path.read_text()).body
                   if isinstance(node, ast.Import | ast.ImportFrom)
                   for alias in node.names}
        assert not [m for m in imports if m.split(".")[0] in ("torch", "transformers")]
        assert not [m for m in imports if m.startswith("rlhfless.")
                    and not m.startswith("rlhfless.api") and not _allowed(m, PURE_MODEL)]


def test_the_job_metrics_load_nothing_of_the_driver_or_the_ml_stack() -> None:
    """One definition of a job's series, shared by the operator, `rlhfless run` and driver
    pods: the operator may load it."""
    for forbidden in ("rlhfless.driver", "rlhfless.operator", "rlhfless.runtime",
                      "rlhfless.knative", "rlhfless.functions", "rlhfless.model",
                      "rlhfless.store", "torch"):
        assert offenders(("jobmetrics.py",), forbidden) == [], forbidden


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


def test_the_operator_process_never_imports_torch_or_a_model_loader() -> None:
    """What the operator runs (handlers, spec validation) loads no ML library at all."""
    import subprocess
    import sys

    code = ("import sys, rlhfless.operator.main, rlhfless.operator.handlers\n"
            "from rlhfless.api.spec import parse_spec\n"
            "parse_spec({'model': {'source': 'hf', 'path': '/x'}, 'reward': {'name': 'format'}},"
            " 'j')\n"
            f"pure = {PURE_MODEL!r} + ('rlhfless.model',)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') or "
            "(m.startswith(('rlhfless.model', 'rlhfless.store', 'rlhfless.driver')) "
            "and m not in pure)]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]"
