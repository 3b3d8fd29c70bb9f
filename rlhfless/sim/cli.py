"""`rlhfless simulate`: run the simulator's experiments, print tables, save CSV/Markdown/PNG.

`simulate_command` is a plain function (no typer here); the CLI module mounts it.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlhfless.sim import experiments, plots

Row = dict[str, object]
CHOICES = ("paper", "ablation", "sensitivity", "frontier", "all")

_PLOTS = {
    "paper": plots.plot_paper,
    "tails": lambda rows, path: plots.plot_sweep(
        rows, "sigma", path, "Tail heaviness (σ of prompt-level lengths), 70B, 20 nodes"),
    "ablation": plots.plot_ablation,
    "sensitivity": plots.plot_sensitivity,
    "frontier": plots.plot_frontier,
}


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if v != v:  # nan
            return "-"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:,.0f}"
    return "-" if v is None else str(v)


def render(title: str, rows: Sequence[Row]) -> Table:
    table = Table(title=title, show_lines=False)
    for key in rows[0]:
        table.add_column(key, justify="right")
    for r in rows:
        table.add_row(*(_fmt(r.get(k)) for k in rows[0]))
    return table


def save(name: str, rows: Sequence[Row], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    csv_path = out / f"{name}.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    md_path = out / f"{name}.md"
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    png = _PLOTS[name](list(rows), out / f"{name}.png")
    return [csv_path, md_path, png]


def simulate_command(experiment: str = "paper", out: str | Path = "benchmarks/results",
                     seed: int = 0, quick: bool = False,
                     console: Console | None = None) -> dict[str, list[Row]]:
    """Run one experiment (or all), print its tables, write <name>.csv/.md/.png under `out`.

    paper also runs the tail-heaviness sweep ("tails").  quick: fewer configurations (for
    smoke tests).  Returns the rows per experiment name.
    """
    if experiment not in CHOICES:
        raise ValueError(f"experiment must be one of {CHOICES}, got {experiment!r}")
    console = console or Console()
    names = {
        "paper": ["paper", "tails"],
        "all": ["paper", "tails", "ablation", "sensitivity", "frontier"],
    }.get(experiment, [experiment])
    results: dict[str, list[Row]] = {}
    for name in names:
        started = time.perf_counter()
        rows = experiments.EXPERIMENTS[name](seed=seed, quick=quick)
        elapsed = time.perf_counter() - started
        results[name] = rows
        console.print(render(f"{name} (seed {seed}, {elapsed:.0f} s)", rows))
        for path in save(name, rows, Path(out)):
            console.print(f"  wrote {path}")
    return results
