"""Shared helpers of the embedded-runtime benchmarks: build a tiny job, run it, summarise."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from pathlib import Path
from typing import Any

from rlhfless.api.spec import RLHFJob, parse_job
from rlhfless.driver import Driver
from rlhfless.driver.records import MetricsLog
from rlhfless.runtime.local import LocalRuntime


def tiny_job(name: str, prompts: int, group: int, tokens: int, steps: int,
             scheduling: dict[str, Any] | None = None) -> RLHFJob:
    return parse_job({
        "apiVersion": "rlhfless.io/v1alpha1", "kind": "RLHFJob", "metadata": {"name": name},
        "spec": {
            "model": {"source": "tiny", "tiny": {"nLayer": 2, "nEmbd": 128, "nHead": 4,
                                                  "nPositions": 512}},
            "algorithm": {"name": "grpo", "groupSize": group, "lr": 0.003, "klBeta": 0.01,
                          "miniBatchSize": prompts * group},
            "dataset": {"kind": "arithmetic", "size": 4 * prompts, "promptsPerStep": prompts},
            "reward": {"name": "target_char", "args": {"char": "5"}},
            "generation": {"maxNewTokens": tokens},
            "scheduling": {"maxActors": 4, "actors": 2, "keepAliveS": 600,
                           **(scheduling or {})},
            "steps": steps,
        },
    })


def run_job(job: RLHFJob) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)

        async def go() -> None:
            async with LocalRuntime(job, run_dir / "store", run_dir, threads_per_instance=1) as rt:
                await Driver(job, rt, run_dir).run()

        asyncio.run(go())
        return MetricsLog(run_dir / "metrics.jsonl").read()


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r.get(key, 0.0)) for r in rows)
