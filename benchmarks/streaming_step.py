"""Barrier step vs streaming step on the embedded runtime, one run, same seeds, warm functions.

The job: a tiny model, one GRPO group per prompt, and a real long tail: every prompt has its
own response budget drawn from a lognormal (a `max_new_tokens` field per dataset row), so a
few prompts generate far longer than the rest. Both paths run the same job from the same
state with the same rollouts; only the step's shape differs:

- barrier: every actor done → rewards → learner adds → finish;
- streaming: the learner's begin goes out with the rollout, each group is scored and added
  the moment its samples are done, then finish.

One optimizer step per RL step (miniBatchSize = the batch), so the two paths' weights after
step 1 differ only by float summation order (`max |dw|`). Both paths' functions run side by
side and their steps alternate (barrier step k, streaming step k, ...), so a change in the
machine's load hits both alike. Step times are medians over the warm steps (step 1, with
every function's cold start, is left out). Functions run one thread each and stay warm
(long keep-alive, no prewarm release, no cut: a cut actor would scale down and cold-start
again). GPU-seconds count each path's instances (1 GPU per actor and learner, 0 for reward)
alive during its steps.

    python benchmarks/streaming_step.py [--steps 6] [--actors 1] [--out runs/streaming_step]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from rlhfless.api.spec import RLHFJob, parse_job
from rlhfless.driver import Driver
from rlhfless.driver.plots import write_plots
from rlhfless.driver.records import MetricsLog
from rlhfless.runtime.local import LocalRuntime
from rlhfless.store import WeightStore


def write_dataset(path: Path, prompts: int, median: float, sigma: float, cap: int,
                  seed: int) -> np.ndarray:
    """Prompts with lognormal response budgets; returns the budgets."""
    rng = np.random.default_rng(seed)
    budgets = np.clip(np.round(rng.lognormal(np.log(median), sigma, prompts)), 4, cap)
    with path.open("w") as out:
        for i, budget in enumerate(budgets.astype(int)):
            out.write(json.dumps({"id": f"q{i}", "prompt": f"Task {i}:",
                                  "max_new_tokens": int(budget)}) + "\n")
    return budgets


def job(name: str, dataset: Path, args: argparse.Namespace, streaming: bool) -> RLHFJob:
    return parse_job({
        "apiVersion": "rlhfless.io/v1alpha1", "kind": "RLHFJob", "metadata": {"name": name},
        "spec": {
            "model": {"source": "tiny", "tiny": {"nLayer": args.layers, "nEmbd": args.width,
                                                  "nHead": 4, "nPositions": args.max_tokens + 32,
                                                  "seed": 0}},
            "algorithm": {"name": "grpo", "groupSize": args.group, "lr": 1e-5, "klBeta": 0.01,
                          "miniBatchSize": args.prompts * args.group},
            "dataset": {"kind": "jsonl", "path": str(dataset),
                        "promptsPerStep": args.prompts},
            "reward": {"name": "target_char", "args": {"char": "5"}},
            "generation": {"maxNewTokens": args.max_tokens},
            "scheduling": {"actors": args.actors, "maxActors": args.actors,
                           "costAware": False, "cutMigrate": False, "prewarm": False,
                           "keepAliveS": 3600, "streaming": streaming},
            "checkpoint": {"keep": args.steps + 1},  # v1 of both paths stays for max |dw|
            "steps": args.steps,
            "seed": 0,
        },
    })


async def run_alternating(jobs: dict[str, RLHFJob], out: Path) -> dict[str, list]:
    """Every path's steps, alternating between the paths (all functions stay warm)."""
    async with contextlib.AsyncExitStack() as stack:
        drivers = {}
        for mode, job in jobs.items():
            run_dir = out / mode
            shutil.rmtree(run_dir, ignore_errors=True)
            runtime = await stack.enter_async_context(
                LocalRuntime(job, run_dir / "store", run_dir, threads_per_instance=1))
            drivers[mode] = Driver(job, runtime, run_dir)
            await asyncio.to_thread(drivers[mode].prepare)
        for step in range(1, next(iter(jobs.values())).spec.steps + 1):
            for mode, driver in drivers.items():
                await driver.step(step)
                print(f"  {mode} step {step} done", flush=True)
    rows = {}
    for mode in jobs:
        rows[mode] = MetricsLog(out / mode / "metrics.jsonl").read()
        write_plots(rows[mode], out / mode)
    return rows


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r.get(key, 0.0)) for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="RL steps per path (≥ 6)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--median", type=float, default=20.0, help="median response budget")
    parser.add_argument("--sigma", type=float, default=1.2, help="lognormal σ of the budgets")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/streaming_step"))
    args = parser.parse_args()
    if args.steps < 6:
        parser.error("--steps must be at least 6 (the medians skip the cold first step)")
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = args.out / "longtail.jsonl"
    budgets = write_dataset(dataset, args.prompts, args.median, args.sigma, args.max_tokens, 0)

    jobs = {mode: job(f"bench-{mode}", dataset, args, mode == "streaming")
            for mode in ("barrier", "streaming")}
    rows = asyncio.run(run_alternating(jobs, args.out))
    weights = {mode: WeightStore(args.out / mode / "store").load(1)[0] for mode in rows}
    dw = max(float(np.abs(weights["barrier"][k].numpy() - weights["streaming"][k].numpy())
                   .max()) for k in weights["barrier"])
    warm = {mode: r[1:] for mode, r in rows.items()}

    print(f"budgets (lognormal, median {args.median:g}, σ {args.sigma:g}): "
          f"p50 {np.percentile(budgets, 50):.0f} p99 {np.percentile(budgets, 99):.0f} "
          f"max {budgets.max():.0f} tokens")
    lengths = warm["streaming"][-1]
    print(f"response lengths (last step): p50 {lengths['response_length/p50']:.0f} "
          f"p99 {lengths['response_length/p99']:.0f} max {lengths['response_length/max']:.0f}")
    for mode, r in warm.items():
        print(f"{mode:9s} step {median(r, 'timing_s/step'):.3f} s  gen "
              f"{median(r, 'timing_s/gen'):.3f} s  learner busy "
              f"{median(r, 'timing_s/update_actor'):.3f} s  overlap "
              f"{median(r, 'timing_s/overlap'):.3f} s  after last actor "
              f"{median(r, 'timing_share/after_rollout'):.0%}  GPU-s/step "
              f"{median(r, 'cost/gpu_seconds'):.2f}  (median of {len(r)} warm steps)")
    speedup = median(warm["barrier"], "timing_s/step") / median(warm["streaming"],
                                                                 "timing_s/step")
    print(f"timelines: {args.out / 'barrier' / 'timeline.png'}, "
          f"{args.out / 'streaming' / 'timeline.png'}")
    print(f"streaming speedup: {speedup:.3f}")
    print(f"max |dw|: {dw:.3g}")


if __name__ == "__main__":
    main()
