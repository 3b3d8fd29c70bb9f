"""Where a step's wall time goes on the embedded runtime: inside stage functions vs overhead.

Overhead = step wall time − the step's critical path inside functions (the slowest actor's
function time + what runs after the last actor: the last groups' reward and learner adds
and the learner's finish, driver-observed, so their HTTP is counted as inside). It holds the
rollout's HTTP and frame decoding, the driver's own work (tokenising, shards) and scheduling.
Functions are kept warm (long keep-alive, no prewarm-driven release, so no cold start is
exposed) and the first steps are skipped, so this measures the steady state of the runtime
itself; exposed cold starts are a scheduling matter (see benchmarks/ablation.py).

    python benchmarks/runtime_overhead.py [--steps 6] [--skip 2]
"""

from __future__ import annotations

import argparse

from _tiny import median, run_job, tiny_job
from rich.console import Console
from rich.table import Table

BATCHES = ((4, 4, 32), (8, 8, 64), (16, 8, 128))  # prompts, group size, max new tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps not counted")
    args = parser.parse_args()
    table = Table(title="Embedded runtime: share of step time inside stage functions")
    for col in ("prompts × G × tokens", "step s", "inside functions s", "overhead s",
                "inside share"):
        table.add_column(col, justify="right")
    for prompts, group, tokens in BATCHES:
        job = tiny_job("overhead", prompts, group, tokens, args.steps,
                       {"costAware": False, "cutMigrate": False, "prewarm": False})
        rows = run_job(job)[args.skip:]
        step, inside = median(rows, "timing_s/step"), median(rows, "timing_s/in_functions")
        table.add_row(f"{prompts} × {group} × {tokens}", f"{step:.2f}", f"{inside:.2f}",
                      f"{step - inside:.2f}", f"{inside / step:.1%}")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
