"""kopf handlers: the story of one RLHFJob.

1. created / resumed / spec changed → validate the spec (a bad one is reported as
   Ready=False, reason InvalidSpec, naming the field, and nothing is created), then
   get-or-create the job's children (`knative.manifests`: one Knative Service per deployed
   stage), owned by the job (deleting the job deletes them through owner references).
2. a daemon per job acts on `decide(...)` (operator/decide.py): it reports an invalid
   spec, suspends, reports success, backs off after failures, or runs the driver with the
   runtime and patches the status (`status.cost` included) after every step.
   `spec.suspend: true` stops it after the current step and scales every stage to zero;
   `false` resumes from the checkpoint. When the next step would cross `spec.budget` it
   stops the same way with condition BudgetExceeded; raising the budget resumes it.
   Any other spec change restarts the driver after the current step. When kopf stops the
   daemon (job deleted, operator exiting) the step in flight is abandoned; the next
   operator resumes after the last checkpointed step, so no recorded step is repeated.

Handlers and daemon share a per-job `JobState` in kopf's per-object memo; only the daemon
writes the status, so status patches never race each other. The handlers are registered at
import on this module's `registry`; what differs between a cluster and a test (login, API
client, runtime and driver factories) reaches them as `Hooks` in kopf's memo.
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
from rlhfless.cost import BudgetCheck, Ledger, check_budget, cost_status
from rlhfless.driver.records import MetricsLog, StepRecord
from rlhfless.knative.kube import Kube
from rlhfless.knative.manifests import job_manifests
from rlhfless.model.fit import check_job
from rlhfless.operator import status as st
from rlhfless.operator.config import Hooks, JobContext
from rlhfless.operator.decide import Action, JobView, decide
from rlhfless.operator.metrics import OperatorMetrics
from rlhfless.store import load_checkpoint

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
        job = parse_job(document, f"{namespace}/{name}")
    except SpecError as exc:
        return None, exc.errors
    # Memory plan and tensor parallelism from shapes known without files: the operator
    # never opens a path named in a spec (a local model is sized by `rlhfless validate`).
    errors = check_job(job.spec, open_files=False).errors
    return (None, errors) if errors else (job, [])


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


def recorded_cost(run_dir: Any, job: RLHFJob) -> tuple[Ledger, BudgetCheck]:
    """Spend over the checkpointed steps (metrics.jsonl) and the budget check on it; an
    unreadable log counts as no spend (logged), it must not stop the daemon."""
    try:
        rows = MetricsLog(run_dir / "metrics.jsonl").read(upto=_safe_steps(run_dir))
        ledger = Ledger.of(rows)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("cost of %s not read from its metrics log: %s", job.metadata.name, exc)
        ledger = Ledger()
    return ledger, check_budget(ledger, job.spec.budget)


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


registry = kopf.OperatorRegistry()
RESOURCE = (API_GROUP, VERSION, PLURAL)
HOOKS_KEY = "hooks"


def operator_memo(hooks: Hooks) -> kopf.Memo:
    """The memo kopf hands every handler (copied per job): how to reach the cluster, build
    runtimes and drivers."""
    return kopf.Memo({HOOKS_KEY: hooks})


def _hooks(memo: Any) -> Hooks:
    return memo[HOOKS_KEY]


@kopf.on.login(registry=registry)
async def login(memo: kopf.Memo, logger: logging.Logger, **kwargs: Any) -> Any:
    """The hooks' login (tests: the emulated cluster), else kubernetes_asyncio's config."""
    hooks = _hooks(memo)
    if hooks.login is not None:
        return hooks.login(logger=logger, **kwargs)
    return await kopf.login_via_async_client(logger=logger, **kwargs)


@kopf.on.startup(registry=registry)
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    configure(settings)
    memo["kube"] = Kube(await _hooks(memo).api_client())


@kopf.on.cleanup(registry=registry)
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    kube = memo.get("kube")
    if kube is not None:
        await kube.api.close()


@kopf.on.create(*RESOURCE, registry=registry, backoff=5)
@kopf.on.resume(*RESOURCE, registry=registry, backoff=5)
@kopf.on.update(*RESOURCE, field="spec", registry=registry, backoff=5)
async def reconcile(spec: kopf.Spec, meta: kopf.Meta, name: str, namespace: str, uid: str,
                    memo: kopf.Memo, logger: logging.Logger, old: Any = None,
                    **_: Any) -> None:
    """Validate, then get-or-create the job's children; tell the daemon."""
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
    manifests = job_manifests(job, namespace=namespace, uid=uid,
                              settings=_hooks(memo).config.functions)
    services = [m["metadata"]["name"] for m in manifests if m["kind"] == "Service"]
    if state.job is not None and state.services == services:
        # A change to a running job (suspend, steps, ...): tell the daemon first, so it
        # stops after the current step instead of after the Services are rolled.
        state.update(job, None, services, generation)
    for manifest in manifests:
        _, verb = await kube.apply_service(manifest)
        if verb != "unchanged":
            logger.info("%s %s %s", manifest["kind"], manifest["metadata"]["name"], verb)
    state.update(job, None, services, generation)


@kopf.daemon(*RESOURCE, registry=registry, cancellation_backoff=2.0, cancellation_timeout=30.0)
async def run_job(name: str, namespace: str, uid: str, status: kopf.Status, memo: kopf.Memo,
                  stopped: kopf.DaemonStopped, logger: logging.Logger, **_: Any) -> None:
    """Act on `decide(...)` whenever the job changes: report, suspend, or run the driver."""
    hooks, state, kube = _hooks(memo), job_state(memo), memo["kube"]
    config = hooks.config
    reporter = _Reporter(kube, namespace, name, list(status.get("conditions") or []),
                         hooks.metrics)
    run_dir, store_dir = config.job_paths(namespace, name, uid)
    interval = config.watch_interval_s
    failures, failed_version, retry_due, last_error = 0, -1, False, ""
    try:
        while await _wait(lambda: state.version > 0, stopped, interval):
            seen, job = state.version, state.job
            if seen != failed_version:
                failures, retry_due = 0, False
            ledger, budget = recorded_cost(run_dir, job) if job else (Ledger(), BudgetCheck())
            view = JobView(valid=job is not None, suspend=bool(job and job.spec.suspend),
                           steps_done=_safe_steps(run_dir), steps=job.spec.steps if job else 0,
                           failures=0 if retry_due else failures,
                           max_retries=config.max_retries, over_budget=budget.exceeded)
            action = decide(view)
            if action is Action.INVALID:
                await reporter.write(st.invalid_spec(reporter.conditions, state.errors or [],
                                                     state.generation))
            elif action is Action.RETRY:
                await reporter.write(st.failed(reporter.conditions, last_error,
                                               state.generation, config.retry_backoff_s))
                retry_due = not await _wait_change(state, seen, stopped, interval,
                                                   config.retry_backoff_s)
                continue
            elif action is Action.GIVE_UP:
                await reporter.write(st.failed(reporter.conditions, last_error,
                                               state.generation, None))
            else:
                assert job is not None
                ctx = JobContext(job, namespace, name, uid, run_dir, store_dir, kube, config)
                retry_due = False
                try:
                    if action is Action.SUSPEND:
                        await _scale_to_zero(ctx, hooks)
                        await reporter.write(st.suspended(reporter.conditions,
                                                          view.steps_done, state.generation))
                    elif action is Action.BUDGET:  # raising spec.budget is a change: resumes
                        await _scale_to_zero(ctx, hooks)
                        await reporter.write(st.budget_exceeded(
                            reporter.conditions, view.steps_done, budget.message,
                            state.generation, cost=cost_status(ledger)))
                    elif action is Action.SUCCEEDED:
                        await reporter.write(st.succeeded(reporter.conditions,
                                                          view.steps_done, state.generation))
                    elif await _drive(ctx, hooks, state, seen, stopped, reporter) == "stopped":
                        return
                    elif (state.version == seen and completed_steps(run_dir) < job.spec.steps
                          and not recorded_cost(run_dir, job)[1].exceeded):
                        raise RuntimeError(f"driver stopped after {completed_steps(run_dir)} "
                                           f"of {job.spec.steps} steps")
                    else:
                        continue  # finished, suspended or changed: decide again right away
                except Exception as exc:  # a failed step or checkpoint: decide on a retry
                    progressed = _safe_steps(run_dir) > view.steps_done >= 0
                    failures = 1 if progressed else failures + 1  # failures in a row
                    failed_version, last_error = seen, f"{type(exc).__name__}: {exc}"
                    logger.exception("job failed (attempt %d)", failures)
                    continue
            await _wait_change(state, seen, stopped, interval)
    finally:
        reason = stopped.reason
        if reason is not None and kopf.DaemonStoppingReason.RESOURCE_DELETED in reason:
            hooks.metrics.forget(namespace, name)


async def _scale_to_zero(ctx: JobContext, hooks: Hooks) -> None:
    async with hooks.runtime_factory(ctx) as runtime:
        for stage in ctx.job.spec.stages.deployed:
            await runtime.scale(stage, 0)


async def _drive(ctx: JobContext, hooks: Hooks, state: JobState, seen: int,
                 stopped: kopf.DaemonStopped, reporter: _Reporter) -> str:
    """One driver run: "ran" when it returned (done, suspended or spec changed), "stopped"
    when kopf stopped the daemon (the step in flight is abandoned, never recorded)."""
    job = ctx.job
    stop = asyncio.Event()
    async with hooks.runtime_factory(ctx) as runtime:
        done = completed_steps(ctx.run_dir)
        ledger, _ = recorded_cost(ctx.run_dir, job)
        await reporter.write(st.started(reporter.conditions, state.services, done,
                                        job.spec.steps, state.generation,
                                        has_budget=job.spec.budget.limited))

        async def on_step(record: StepRecord) -> None:
            ledger.add(record.metrics)
            budget = check_budget(ledger, job.spec.budget)
            if budget.exceeded:
                stop.set()  # the driver stops itself too; this covers any DriverLike
            await reporter.write(st.step_done(reporter.conditions, record, job.spec.steps,
                                              state.generation, cost=cost_status(ledger)))
            hooks.metrics.observe_step(ctx.namespace, ctx.name, record)
            hooks.metrics.observe_budget(ctx.namespace, ctx.name, budget.used)
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
        hooks.metrics.driver_started(ctx.namespace, ctx.name, job.spec.stages.deployed)
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
            hooks.metrics.driver_stopped(ctx.namespace, ctx.name)
    return "stopped" if stopped else "ran"
