"""`rlhfless driver`: one job's driver, in the job's own pod.

The operator runs this in a `batch/v1` Job per RLHFJob (`knative.driver`). It is the same
`Driver` as `rlhfless run`, on the Knative runtime, with the job's token and only the job's
folder of the store volume, priced with the cluster's GPU prices the operator hands it
(`rlhfless.cost.prices.COST_ENV`). After every step it publishes its progress into the job's
progress ConfigMap, the one object its Role lets it write: the step, its metrics, and the
spend so far; the operator turns that into the RLHFJob's status (`status.cost` included)
and its Prometheus series. The operator itself never loads a model or opens a path named in
a spec: this pod does, and reports what went wrong.

SIGTERM (suspend, a spec change, eviction) finishes the step in flight, checkpoints it and
exits 0; a second SIGTERM abandons the step (the next driver redoes it from the checkpoint).
When the next step would cross `spec.budget` the driver checkpoints and exits 0; the
operator sees the spend and reports BudgetExceeded. A failure is published with its message
and exits 1. With `--metrics-port` the pod also serves the job's series itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Protocol

from rlhfless.api.progress import PROGRESS_KEY, Progress
from rlhfless.api.spec import RLHFJob, SpecError, job_namespace, load_job, parse_job
from rlhfless.api.wire import JOB_ENV, TOKEN_ENV
from rlhfless.cost import Ledger
from rlhfless.driver import Driver
from rlhfless.driver.progress import ProgressTracker, step_summary
from rlhfless.driver.records import StepRecord
from rlhfless.jobmetrics import JobReporter
from rlhfless.knative.driver import progress_name
from rlhfless.knative.kube import Kube
from rlhfless.runtime.base import Runtime

Publish = Callable[[Progress], Awaitable[None]]
log = logging.getLogger("rlhfless.driver")


class DriverLike(Protocol):
    """What `drive` needs of a driver (tests substitute one without the ML)."""

    saved_step: int
    ledger: Ledger  # the spend over the steps recorded so far (after `prepare`)

    def prepare(self) -> str | None: ...

    async def run(self, stop: asyncio.Event | None = None,
                  on_step: Callable[[StepRecord], Awaitable[None]] | None = None) -> int: ...


DriverFactory = Callable[[RLHFJob, Runtime, Path, Path], DriverLike]


def real_driver(job: RLHFJob, runtime: Runtime, run_dir: Path, store_dir: Path) -> DriverLike:
    return Driver(job, runtime, run_dir, store_dir=store_dir)


class ConfigMapPublisher:
    """Writes progress into the job's ConfigMap; a failed write is retried, then logged (the
    next write carries the whole state again, and the checkpoint on disk is the truth)."""

    def __init__(self, kube: Kube, namespace: str, job_name: str, attempts: int = 3):
        self.kube, self.namespace, self.name = kube, namespace, progress_name(job_name)
        self.attempts = attempts

    async def __call__(self, progress: Progress) -> None:
        for attempt in range(self.attempts):
            try:
                await self.kube.write_config_map(self.namespace, self.name,
                                                 {PROGRESS_KEY: progress.dump()})
                return
            except Exception as exc:  # noqa: BLE001 - a lost report must not fail the job
                if attempt == self.attempts - 1:
                    log.warning("progress not published: %s", exc)
                else:
                    await asyncio.sleep(0.5 * 2**attempt)


async def drive(job: RLHFJob, runtime: Runtime, run_dir: Path, store_dir: Path,
                publish: Publish, stop: asyncio.Event, ready_timeout_s: float = 1200.0,
                make_driver: DriverFactory = real_driver,
                reporter: JobReporter | None = None) -> int:
    """Run the job's driver from its checkpoint until done, `stop` or the budget; the exit
    code. `reporter`: the job's own Prometheus series (`--metrics-port`)."""
    driver = make_driver(job, runtime, run_dir, store_dir)
    tracker = ProgressTracker(job.spec.steps, driver.saved_step)
    await publish(tracker.snapshot("starting"))
    try:
        notice = await asyncio.to_thread(driver.prepare)
        tracker.progress = tracker.progress.model_copy(
            update={"checkpoint_step": driver.saved_step})
        await publish(tracker.snapshot("running", notice=notice, cost=driver.ledger.report()))
        wait_ready = getattr(runtime, "wait_ready", None)
        if wait_ready is not None:  # Knative: routes exist, a first pod loaded its weights
            await wait_ready(timeout_s=ready_timeout_s)

        async def on_step(record: StepRecord) -> None:
            usages = runtime.meter()
            summary = step_summary(record, usages)
            await publish(tracker.step(summary, driver.saved_step, driver.ledger.report()))
            if reporter is not None:
                budget = getattr(driver, "budget", None)
                reporter.step(record, usages, budget.used if budget is not None else None)

        if reporter is not None:
            reporter.driver_started()
        try:
            done = await driver.run(stop=stop, on_step=on_step)
        finally:
            if reporter is not None:
                reporter.driver_stopped()
    except Exception as exc:  # noqa: BLE001 - every failure reaches the job's status
        log.exception("driver failed")
        await publish(tracker.snapshot("failed", error=f"{type(exc).__name__}: {exc}"))
        return 1
    await publish(tracker.snapshot("done" if done >= job.spec.steps else "stopped",
                                   cost=driver.ledger.report()))
    return 0


def job_from(path: Path | None) -> RLHFJob:
    """The job from a file, else from RLHFJOB_SPEC (what the operator sets)."""
    if path is not None:
        return load_job(path)
    text = os.environ.get(JOB_ENV)
    if not text:
        raise SpecError([f"no job: pass --job or set {JOB_ENV}"], "driver")
    try:
        return parse_job(json.loads(text), JOB_ENV)
    except ValueError as exc:
        raise SpecError([f"{JOB_ENV} is not JSON: {exc}"], JOB_ENV) from None


def with_cluster_prices(job: RLHFJob, env: Mapping[str, str]) -> RLHFJob:
    """The job priced with the cluster's GPU type and prices, as the operator hands them on
    in the pod's environment (a bad value: ValueError naming the variable)."""
    from rlhfless.cost.prices import cost_defaults_from_env, priced_job

    return priced_job(job, cost_defaults_from_env(env))


async def main(job: RLHFJob, *, namespace: str, run_dir: Path, store_dir: Path,
               metrics_port: int | None = None) -> int:
    """The pod's entry: Knative runtime, progress to the ConfigMap, SIGTERM → stop."""
    from rlhfless.jobmetrics import JobMetrics
    from rlhfless.knative.kube import cluster_api_client
    from rlhfless.knative.pods import FunctionSettings
    from rlhfless.knative.runtime import KnativeRuntime

    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        log.error("no function token: %s is not set (the job's Secret)", TOKEN_ENV)
        return 2
    try:
        job = with_cluster_prices(job, os.environ)
    except ValueError as exc:
        log.error("cost settings: %s", exc)
        return 2
    settings = FunctionSettings.from_env()
    reporter, server = None, None
    if metrics_port is not None:
        metrics = JobMetrics()
        server = metrics.serve(metrics_port)  # MetricsPortError: the command exits 2
        reporter = JobReporter(metrics, job_namespace(job), job.metadata.name,
                               tuple(job.spec.stages.deployed))
    stop = asyncio.Event()
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set() and task is not None:
            task.cancel()  # a second signal: abandon the step in flight
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, on_signal)
    try:
        api = await cluster_api_client(user_agent="rlhfless-driver")
        async with api:
            kube = Kube(api)
            publish = ConfigMapPublisher(kube, namespace, job.metadata.name)
            async with KnativeRuntime(job, namespace=namespace, kube=kube, token=token,
                                      settings=settings,
                                      meter_interval_s=settings.meter_interval_s) as runtime:
                return await drive(job, runtime, run_dir, store_dir, publish, stop,
                                   float(settings.progress_deadline_s), reporter=reporter)
    finally:
        if server is not None:
            server.close()
