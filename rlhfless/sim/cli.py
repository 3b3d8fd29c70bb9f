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
GROUPS: dict[str, list[str]] = {
    "headline": ["headline", "headline_details"],
    "testbed": ["testbed"],
    "planner": ["planner"],
    "coldstart": ["coldstart"],
    "ablation": ["ablation"],
    "frontier": ["frontier"],
    "sensitivity": ["sensitivity"],
}
GROUPS["all"] = [name for names in GROUPS.values() for name in names]
CHOICES = tuple(GROUPS)

_PLOTS = {
    "headline": plots.plot_headline,
    "headline_details": plots.plot_details,
    "testbed": plots.plot_testbed,
    "planner": plots.plot_planner,
    "coldstart": plots.plot_coldstart,
    "ablation": plots.plot_ablation,
    "frontier": plots.plot_frontier,
    "sensitivity": plots.plot_sensitivity,
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


def headline_line(r: Row) -> str:
    """One printed line per headline row."""
    return (f"{r['cluster']} {r['model']} {r['algo']} {r['workload']} {r['mode']}: "
            f"speedup {r['speedup']:.2f}x, saving {r['saving']:.1%}, "
            f"peak {r['peak_gpus']} GPUs, verl gen share {r['verl_gen_share']:.0%}, "
            f"step/bound {r['step_over_bound']:.2f}")


def save(name: str, rows: Sequence[Row], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    csv_path = out / f"{name}.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows({k: _csv(r.get(k)) for k in keys} for r in rows)
    md_path = out / f"{name}.md"
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    png = _PLOTS[name](list(rows), out / f"{name}.png")
    return [csv_path, md_path, png]


def _csv(v: object) -> object:
    return round(v, 4) if isinstance(v, float) else v


def simulate_command(experiment: str = "headline", out: str | Path = "benchmarks/results",
                     seed: int = 0, quick: bool = False,
                     console: Console | None = None) -> dict[str, list[Row]]:
    """Run one experiment group (or all), print it, write <name>.csv/.md/.png under `out`.

    quick: fewer configurations (for smoke tests). Returns the rows per experiment name.
    """
    if experiment not in CHOICES:
        raise ValueError(f"experiment must be one of {', '.join(CHOICES)}; got {experiment!r}")
    console = console or Console()
    results: dict[str, list[Row]] = {}
    for name in GROUPS[experiment]:
        started = time.perf_counter()
        rows = experiments.EXPERIMENTS[name](seed=seed, quick=quick)
        elapsed = time.perf_counter() - started
        results[name] = rows
        if name == "headline":
            console.print(f"headline (seed {seed}, {elapsed:.0f} s)")
            for r in rows:
                console.print(headline_line(r), soft_wrap=True)
        else:
            console.print(render(f"{name} (seed {seed}, {elapsed:.0f} s)", rows))
        for path in save(name, rows, Path(out)):
            console.print(f"  wrote {path}")
    return results
