"""Ablation on the embedded tiny job: step time and GPU-seconds with each policy off.

Every variant runs the same job (same prompts, seeds and model) on the embedded runtime; the
first step (cold starts of every function) is reported separately from the warm median.
Numbers on a tiny CPU model are dominated by process cold starts and HTTP, not by decoding, so
they show the mechanisms working end to end, not GPU-scale gains (see `rlhfless simulate`).

    python benchmarks/ablation.py [--steps 5]
"""

from __future__ import annotations

import argparse

from _tiny import median, run_job, tiny_job
from rich.console import Console
from rich.table import Table

VARIANTS: dict[str, dict[str, object]] = {
    "all on": {},
    "no length prediction": {"lengthPrediction": False},
    "round-robin assignment": {"assignment": "round-robin"},
    "no hand-off cut": {"cutMigrate": False},
    "barrier step (no streaming)": {"streaming": False},
    "no cost-aware scaling (N=4)": {"costAware": False, "actors": 4},
    "no prewarm / release": {"prewarm": False},
    "no shared-prefix dedup": {"dedupPrefill": False},
    "all off (N=4, RR)": {"lengthPrediction": False, "assignment": "round-robin",
                          "cutMigrate": False, "costAware": False, "actors": 4,
                          "prewarm": False, "dedupPrefill": False, "streaming": False},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    table = Table(title=f"Ablation, tiny job ({args.prompts} prompts × G={args.group}, "
                        f"≤{args.tokens} tokens, {args.steps} steps)")
    for col in ("variant", "step 1 s", "warm step s", "warm GPU-s/step", "actors",
                "migrated/step", "prefill saved/step"):
        table.add_column(col, justify="right")
    for name, sched in VARIANTS.items():
        job = tiny_job("ablation", args.prompts, args.group, args.tokens, args.steps,
                       {"keepAliveS": 30, **sched})
        rows = run_job(job)
        warm = rows[1:] or rows
        table.add_row(name, f"{rows[0]['timing_s/step']:.2f}",
                      f"{median(warm, 'timing_s/step'):.2f}",
                      f"{median(warm, 'cost/gpu_seconds'):.1f}",
                      f"{median(warm, 'sched/actors'):.0f}",
                      f"{median(warm, 'sched/migrated_samples'):.0f}",
                      f"{median(warm, 'perf/prefill_tokens_saved'):.0f}")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
