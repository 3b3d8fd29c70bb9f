"""kopf handlers: the story of one RLHFJob.

1. created / resumed / spec changed → validate the spec (a bad one is reported as
   Ready=False, reason InvalidSpec, naming the field, and nothing is created), then
   get-or-create one Knative Service per stage, owned by the job (deleting the job deletes
   them through owner references).
2. a daemon per job runs the driver with the runtime and patches the status after every
   step. `spec.suspend: true` stops it after the current step and scales every stage to
   zero; `false` resumes from the checkpoint. Any other spec change restarts the driver
   after the current step. When kopf stops the daemon (job deleted, operator exiting) the
   step in flight is abandoned; the next operator resumes after the last checkpointed step,
   so no recorded step is ever repeated.

Handlers and daemon share a per-job `JobState` in kopf's per-object memo; only the daemon
writes the status, so status patches never race each other.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from rlhfless.api.crd import PLURAL, VERSION
from rlhfless.api.spec import API_GROUP, API_VERSION, KIND, RLHFJob, SpecError, parse_job
from rlhfless.checkpoint import load_checkpoint
from rlhfless.operator import status as st
from rlhfless.operator.config import Hooks, JobContext
from rlhfless.operator.kube import Kube
from rlhfless.operator.manifests import build_services, stages_for
from rlhfless.operator.metrics import OperatorMetrics
from rlhfless.records import StepRecord

PREFIX = "rlhfless.io"
log = logging.getLogger(__name__)
FINALIZER = f"{PREFIX}/finalizer"
_MEMO_KEY = "rlhfless_job"


@dataclass
class JobState:
    """What the handlers learned about a job, versioned so the daemon sees every change."""

    job: RLHFJob | None = None
    errors: list[str] | None = None
    services: list[str] = field(default_factory=list)
    generation: int | None = None
    version: int = 0
    accepted: RLHFJob | None = None  # the last valid job: the baseline for immutable fields

    def update(self, job: RLHFJob | None, errors: list[str] | None, services: list[str],
               generation: int | None) -> None:
        """Record a reconcile; the version moves only when something the daemon acts on
        changed (kopf may re-run a handler for an unchanged object)."""
        same = (errors == self.errors and generation == self.generation
                and services == self.services and _dump(job) == _dump(self.job))
        self.job, self.errors, self.services, self.generation = job, errors, services, generation
        if job is not None:
            self.accepted = job
        if not same or self.version == 0:
            self.version += 1


def _dump(job: RLHFJob | None) -> dict[str, Any] | None:
    return None if job is None else job.model_dump(mode="json")


def job_state(memo: Any) -> JobState:
    if _MEMO_KEY not in memo:
        memo[_MEMO_KEY] = JobState()
    return memo[_MEMO_KEY]


def validate(spec: Mapping[str, Any] | None, name: str,
             namespace: str) -> tuple[RLHFJob | None, list[str]]:
    """The parsed job, or every reason it is invalid ("field.path: message"): the same
    rules as `rlhfless validate`, the name's included."""
    document = {"apiVersion": API_VERSION, "kind": KIND,
                "metadata": {"name": name, "namespace": namespace},
                "spec": copy.deepcopy(dict(spec or {}))}
    try:
        return parse_job(document, f"{namespace}/{name}"), []
    except SpecError as exc:
        return None, exc.errors


def immutable_changes(before: RLHFJob | None, job: RLHFJob) -> list[str]:
    """Changes a running job cannot take (the CRD's CEL rules refuse them up front; this
    covers API servers without CEL)."""
    if before is None:
        return []
    errors = []
    if before.spec.model != job.spec.model:
        errors.append("spec.model: is immutable; restore it or create a new RLHFJob")
    if before.spec.algorithm.name != job.spec.algorithm.name:
        errors.append("spec.algorithm.name: is immutable; restore it or create a new RLHFJob")
    return errors


def completed_steps(run_dir: Any) -> int:
    checkpoint = load_checkpoint(run_dir)
    return checkpoint.step if checkpoint is not None else 0


def _safe_steps(run_dir: Any) -> int:
    try:
        return completed_steps(run_dir)
    except Exception:
        return -1


def configure(settings: kopf.OperatorSettings) -> None:
    """Keep kopf's own state in `rlhfless.io/` annotations, never in our status schema."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING  # events for problems, not for every step


class _Reporter:
    """The only writer of a job's status (keeps the conditions it last wrote)."""

    def __init__(self, kube: Kube, namespace: str, name: str,
                 conditions: list[dict[str, Any]], metrics: OperatorMetrics):
        self.kube, self.namespace, self.name = kube, namespace, name
        self.conditions = conditions
        self.metrics = metrics

    async def write(self, status: dict[str, Any], attempts: int = 3) -> None:
        """Patch the whole status; a failing API is retried, then logged: a lost report
        must not fail a GPU job (the next one carries the full state again)."""
        self.conditions = status["conditions"]
        self.metrics.set_phase(self.namespace, self.name, status.get("phase"))
        for attempt in range(attempts):
            try:
                await self.kube.patch_job_status(self.namespace, self.name, status)
                return
            except Exception as exc:
                if attempt == attempts - 1:
                    log.warning("status of %s/%s not written: %s", self.namespace, self.name,
                                exc)
                else:
                    await asyncio.sleep(0.5 * 2**attempt)


async def _wait(condition: Callable[[], bool], stopped: kopf.DaemonStopped, interval: float,
                timeout: float | None = None) -> bool:
    """Poll `condition` until true (→ True), the daemon is stopped or the timeout (→ False)."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while not stopped:
        if condition():
            return True
        if deadline is not None and loop.time() >= deadline:
            return False
        await asyncio.sleep(interval)
    return False


async def _wait_change(state: JobState, seen: int, stopped: kopf.DaemonStopped,
                       interval: float, timeout: float | None = None) -> bool:
    return await _wait(lambda: state.version != seen, stopped, interval, timeout)


def build_registry(hooks: Hooks | None = None) -> kopf.OperatorRegistry:
    """A kopf registry with the RLHFJob handlers bound to `hooks` (one per operator)."""
    hooks = hooks or Hooks()
    config = hooks.config
    registry = kopf.OperatorRegistry()
    resource = (API_GROUP, VERSION, PLURAL)

    kopf.on.login(registry=registry)(hooks.login or kopf.login_via_async_client)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        configure(settings)
        memo["kube"] = Kube(await hooks.api_client())

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        kube = memo.get("kube")
        if kube is not None:
            await kube.api.close()

    @kopf.on.create(*resource, registry=registry, backoff=5)
    @kopf.on.resume(*resource, registry=registry, backoff=5)
    @kopf.on.update(*resource, field="spec", registry=registry, backoff=5)
    async def reconcile(spec: kopf.Spec, meta: kopf.Meta, name: str, namespace: str, uid: str,
                        memo: kopf.Memo, logger: logging.Logger, old: Any = None,
                        **_: Any) -> None:
        """Validate, then get-or-create the stage functions; tell the daemon."""
        state = job_state(memo)
        generation = meta.get("generation")
        job, errors = validate(spec, name, namespace)
        if job is not None:
            # Compare with the job that last ran here (an operator restart forgets it: then
            # with the last spec kopf handled).
            before = state.accepted
            if before is None and isinstance(old, Mapping):
                before, _ = validate(old, name, namespace)
            errors = immutable_changes(before, job)
            job = None if errors else job
        if job is None:
            logger.warning("invalid spec, nothing created: %s", "; ".join(errors))
            state.update(None, errors, [], generation)
            return
        kube: Kube = memo["kube"]
        manifests = build_services(job, namespace=namespace, uid=uid, settings=config.functions)
        services = [m["metadata"]["name"] for m in manifests]
        if state.job is not None and state.services == services:
            # A change to a running job (suspend, steps, ...): tell the daemon first, so it
            # stops after the current step instead of after the Services are rolled.
            state.update(job, None, services, generation)
        for manifest in manifests:
            _, verb = await kube.apply_service(manifest)
            if verb != "unchanged":
                logger.info("Knative Service %s %s", manifest["metadata"]["name"], verb)
        state.update(job, None, services, generation)

    @kopf.daemon(*resource, registry=registry, cancellation_backoff=2.0,
                 cancellation_timeout=30.0)
    async def run_job(name: str, namespace: str, uid: str, status: kopf.Status,
                      memo: kopf.Memo, stopped: kopf.DaemonStopped, logger: logging.Logger,
                      **_: Any) -> None:
        """Run the driver whenever the job is valid, not suspended and not done."""
        state = job_state(memo)
        kube: Kube = memo["kube"]
        reporter = _Reporter(kube, namespace, name, list(status.get("conditions") or []),
                             hooks.metrics)
        run_dir, store_dir = config.job_paths(namespace, name, uid)
        interval = config.watch_interval_s
        failures, failed_version = 0, -1
        try:
            while await _wait(lambda: state.version > 0, stopped, interval):
                seen, job = state.version, state.job
                if seen != failed_version:
                    failures = 0
                if job is None:
                    await reporter.write(st.invalid_spec(reporter.conditions, state.errors or [],
                                                         state.generation))
                    await _wait_change(state, seen, stopped, interval)
                    continue
                ctx = JobContext(job, namespace, name, uid, run_dir, store_dir, kube, config)
                done = -1
                try:
                    done = completed_steps(run_dir)
                    if job.spec.suspend:
                        await _scale_to_zero(ctx, hooks)
                        await reporter.write(st.suspended(reporter.conditions, done,
                                                          state.generation))
                    elif done >= job.spec.steps:
                        await reporter.write(st.succeeded(reporter.conditions, done,
                                                          state.generation))
                    elif await _drive(ctx, hooks, state, seen, stopped, reporter) == "stopped":
                        return
                    elif state.version == seen and completed_steps(run_dir) < job.spec.steps:
                        raise RuntimeError(f"driver stopped after {completed_steps(run_dir)} "
                                           f"of {job.spec.steps} steps")
                    else:
                        continue  # finished, suspended or changed: decide again right away
                except Exception as exc:  # a failed step or checkpoint: report, back off, retry
                    progressed = done >= 0 and _safe_steps(run_dir) > done
                    failures = 1 if progressed else failures + 1  # count failures in a row
                    failed_version = seen
                    retry = config.retry_backoff_s if failures <= config.max_retries else None
                    logger.exception("job failed (attempt %d)", failures)
                    await reporter.write(st.failed(reporter.conditions, f"{type(exc).__name__}: "
                                                   f"{exc}", state.generation, retry))
                    if retry is not None:
                        await _wait_change(state, seen, stopped, interval, retry)
                        continue
                await _wait_change(state, seen, stopped, interval)
        finally:
            reason = stopped.reason
            if reason is not None and kopf.DaemonStoppingReason.RESOURCE_DELETED in reason:
                hooks.metrics.forget(namespace, name)

    return registry


async def _scale_to_zero(ctx: JobContext, hooks: Hooks) -> None:
    async with hooks.runtime_factory(ctx) as runtime:
        for stage in stages_for(ctx.job):
            await runtime.scale(stage, 0)


async def _drive(ctx: JobContext, hooks: Hooks, state: JobState, seen: int,
                 stopped: kopf.DaemonStopped, reporter: _Reporter) -> str:
    """One driver run: "ran" when it returned (done, suspended or spec changed), "stopped"
    when kopf stopped the daemon (the step in flight is abandoned, never recorded)."""
    job = ctx.job
    stop = asyncio.Event()
    async with hooks.runtime_factory(ctx) as runtime:
        done = completed_steps(ctx.run_dir)
        await reporter.write(st.started(reporter.conditions, state.services, done,
                                        job.spec.steps, state.generation))

        async def on_step(record: StepRecord) -> None:
            await reporter.write(st.step_done(reporter.conditions, record, job.spec.steps,
                                              state.generation))
            hooks.metrics.observe_step(ctx.namespace, ctx.name, record)
            hooks.metrics.observe_usage(ctx.namespace, ctx.name, runtime.meter())

        driver = hooks.driver_factory(ctx, runtime)

        async def run_when_ready() -> int:
            # Knative: wait until every Service is Ready (routes exist, a first pod loaded
            # its weights), bounded by the progress deadline Knative itself applies.
            wait_ready = getattr(runtime, "wait_ready", None)
            if wait_ready is not None:
                await wait_ready(timeout_s=float(ctx.config.functions.progress_deadline_s))
            return await driver.run(stop=stop, on_step=on_step)

        task = asyncio.create_task(run_when_ready())
        try:
            while not task.done():
                if stopped:
                    task.cancel()
                    break
                if state.version != seen:
                    stop.set()  # suspend or another spec change: finish this step first
                await asyncio.wait({task}, timeout=ctx.config.watch_interval_s)
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                return "stopped"
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    return "stopped" if stopped else "ran"
