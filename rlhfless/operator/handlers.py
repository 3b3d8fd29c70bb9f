"""kopf handlers: the story of one RLHFJob.

1. created / resumed / spec changed → validate the spec (a bad one is reported as
   Ready=False, reason InvalidSpec, naming the field, and nothing is created), then
   get-or-create the job's standing children (`knative.manifests`: the token's Secret, the
   NetworkPolicy, the driver's ServiceAccount, Role and RoleBinding, the progress ConfigMap,
   one Knative Service per deployed stage), owned by the job (deleting the job deletes them
   through owner references).
2. a daemon per job acts on `decide(...)` (operator/decide.py): it reports an invalid
   spec, suspends, reports success, starts the job's driver pod (a `batch/v1` Job that
   resumes from the checkpoint), stops it (the step in flight finishes first), backs off
   after failures, and turns the progress the driver publishes into the job's status
   (`status.cost` included) and its Prometheus series. `spec.suspend: true` stops the
   driver after the current step and scales every stage to zero; `false` starts a new one.
   When the next step would cross `spec.budget` (checked here on the spend the driver
   published, and by the driver itself, which stops there) the job is reported with
   condition BudgetExceeded and scaled to zero; raising the budget starts a new driver.
   Any other spec change replaces the driver after the current step. The driver does not
   depend on the operator: an operator restart leaves it running, and the next operator
   picks up its progress.

The operator never loads a model, never opens a path named in a spec and mounts no job's
data. Handlers and daemon share a per-job `JobState` in kopf's per-object memo; only the
daemon writes the status, so status patches never race each other. The handlers are
registered at import on this module's `registry`; what differs between a cluster and a test
(login, API client) reaches them as `Hooks` in kopf's memo.
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
from rlhfless.knative.driver import driver_name
from rlhfless.knative.kube import Kube
from rlhfless.knative.manifests import DRIVER_KIND, job_manifests
from rlhfless.knative.pods import job_dir
from rlhfless.model.fit import check_job
from rlhfless.operator import driver_job
from rlhfless.operator import status as st
from rlhfless.operator.config import Hooks
from rlhfless.operator.decide import Action, DriverState, JobView, decide
from rlhfless.operator.metrics import OperatorMetrics
from rlhfless.operator.runs import Failures, Reported

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
    # never opens a path named in a spec (a local model is sized by the driver's pod and
    # by `rlhfless validate`).
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


def configure(settings: kopf.OperatorSettings, namespaced: bool = False) -> None:
    """Keep kopf's own state in `rlhfless.io/` annotations, never in our status schema.
    Watching one namespace, kopf must not scan cluster-scoped namespaces and CRDs: the
    operator then holds a Role in that namespace only."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING  # events for problems, not for every step
    settings.scanning.disabled = namespaced


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
    hooks = _hooks(memo)
    configure(settings, namespaced=hooks.namespace is not None)
    memo["kube"] = Kube(await hooks.api_client())


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
    config = _hooks(memo).config
    manifests = job_manifests(job, namespace=namespace, uid=uid, settings=config.functions,
                              cost=config.cost)
    services = [m["metadata"]["name"] for m in manifests if m["kind"] == "Service"]
    if state.job is not None and state.services == services:
        # A change to a running job (suspend, steps, ...): tell the daemon first, so it
        # stops the driver after the current step instead of after the Services are rolled.
        state.update(job, None, services, generation)
    for manifest in manifests:
        if manifest["kind"] == DRIVER_KIND:
            continue  # the daemon starts and stops the driver
        _, verb = await kube.apply(manifest)
        if verb not in ("unchanged", "exists"):
            logger.info("%s %s %s", manifest["kind"], manifest["metadata"]["name"], verb)
    state.update(job, None, services, generation)


def _desired_driver(job: RLHFJob | None, namespace: str, uid: str,
                    hooks: Hooks) -> dict[str, Any] | None:
    if job is None:
        return None
    manifests = job_manifests(job, namespace=namespace, uid=uid,
                              settings=hooks.config.functions, token="unused",
                              cost=hooks.config.cost)
    return next(m for m in manifests if m["kind"] == DRIVER_KIND)


@dataclass
class _Spend:
    """The driver's published spend, judged against the current spec.budget."""

    ledger: Ledger
    budget: BudgetCheck
    status: dict[str, Any] | None  # status.cost; None until a driver reported

    @classmethod
    def of(cls, obs: driver_job.Observation, job: RLHFJob | None) -> _Spend:
        report = obs.progress.cost
        ledger = Ledger.from_report(report) if report is not None else Ledger()
        budget = check_budget(ledger, job.spec.budget) if job is not None else BudgetCheck()
        return cls(ledger, budget, cost_status(ledger) if report is not None else None)


@kopf.daemon(*RESOURCE, registry=registry, cancellation_backoff=2.0, cancellation_timeout=30.0)
async def run_job(name: str, namespace: str, uid: str, status: kopf.Status, memo: kopf.Memo,
                  stopped: kopf.DaemonStopped, logger: logging.Logger, **_: Any) -> None:
    """Observe the driver and its progress, act on `decide(...)`, report."""
    hooks, state, kube = _hooks(memo), job_state(memo), memo["kube"]
    config = hooks.config
    reporter = _Reporter(kube, namespace, name, list(status.get("conditions") or []),
                         hooks.metrics)
    checkpoint = f"{job_dir(namespace, name, uid)}/run/checkpoint.json"  # on the volume
    interval, poll = config.watch_interval_s, config.progress_interval_s
    reported = Reported(step=int(status.get("step") or 0))  # by an earlier operator too
    failures = Failures()
    metered: str | None = None  # the driver Job whose run the metrics show as running
    try:
        while await _wait(lambda: state.version > 0, stopped, interval):
            seen, job = state.version, state.job
            failures.on_spec(seen)
            desired = _desired_driver(job, namespace, uid, hooks)
            try:
                obs = await driver_job.observe(kube, namespace, name, desired)
            except Exception as exc:  # noqa: BLE001 - the API hiccuped: look again later
                logger.warning("cannot read the driver of %s: %s", name, exc)
                await _wait_change(state, seen, stopped, interval, poll)
                continue
            metered = _meter_driver(hooks.metrics, namespace, name, job, obs, metered)
            progress, spend = obs.progress, _Spend.of(obs, job)
            if notice := reported.new_notice(progress):
                logger.warning("driver: %s", notice)  # kopf posts it as an Event on the job
            new = reported.news(progress)
            for record in new:
                hooks.metrics.observe_step(namespace, name, record)
            if new:
                hooks.metrics.observe_actors(namespace, name, new[-1].actors_alive)
                hooks.metrics.observe_budget(namespace, name, spend.budget.used)
            if new and job is not None:
                await reporter.write(st.step_done(reporter.conditions, new[-1], job.spec.steps,
                                                  checkpoint, state.generation,
                                                  cost=spend.status))
            if failures.judge(obs.driver, obs.uid, obs.failed, obs.message,
                              progress.checkpoint_step, seen):
                logger.warning("driver of %s failed (%d in a row): %s", name, failures.count,
                               obs.message)
            view = JobView(valid=job is not None, suspend=bool(job and job.spec.suspend),
                           steps_done=progress.checkpoint_step,
                           steps=job.spec.steps if job else 0, driver=obs.driver,
                           driver_current=obs.current, failures=failures.pending,
                           max_retries=config.max_retries, over_budget=spend.budget.exceeded)
            action = decide(view)
            try:
                if action is Action.RETRY:
                    await reporter.write(st.failed(reporter.conditions, failures.error,
                                                   state.generation, config.retry_backoff_s))
                    failures.retry_due = not await _wait_change(
                        state, seen, stopped, interval, config.retry_backoff_s)
                    continue
                if await _act(action, view, job, desired, obs, kube, namespace, name, hooks,
                              state, reporter, failures.error, spend):
                    failures.started(progress.checkpoint_step)
            except Exception as exc:  # noqa: BLE001 - an API error: decide again later
                logger.warning("%s for %s failed: %s", action.value, name, exc)
            idle = action in (Action.INVALID, Action.SUSPEND, Action.SUCCEEDED, Action.GIVE_UP,
                              Action.BUDGET)
            await _wait_change(state, seen, stopped, interval, None if idle else poll)
    finally:
        reason = stopped.reason
        if reason is not None and kopf.DaemonStoppingReason.RESOURCE_DELETED in reason:
            hooks.metrics.forget(namespace, name)


def _meter_driver(metrics: OperatorMetrics, namespace: str, name: str, job: RLHFJob | None,
                  obs: driver_job.Observation, metered: str | None) -> str | None:
    """rlhfless_driver_running and _start_time_seconds from the driver Job as observed (an
    operator restarted under a running driver takes the Job's start time, not its own)."""
    if obs.driver in (DriverState.RUNNING, DriverState.STOPPING):
        if obs.uid != metered:
            stages = job.spec.stages.deployed if job is not None else ()
            metrics.driver_started(namespace, name, stages, now=obs.started_at)
        return obs.uid
    if metered is not None:
        metrics.driver_stopped(namespace, name)
    return None


async def _act(action: Action, view: JobView, job: RLHFJob | None,
               desired: dict[str, Any] | None, obs: driver_job.Observation, kube: Kube,
               namespace: str, name: str, hooks: Hooks, state: JobState, reporter: _Reporter,
               last_error: str, spend: _Spend) -> bool:
    """Carry out one decision; True when it started a new driver run."""
    conditions, generation = reporter.conditions, state.generation
    if action is Action.INVALID:
        await reporter.write(st.invalid_spec(conditions, state.errors or [], generation))
    elif action is Action.GIVE_UP:
        await reporter.write(st.failed(conditions, last_error, generation, None))
    elif action is Action.STOP:
        await driver_job.stop(kube, namespace, name)
    elif action is Action.SUSPEND:
        assert job is not None
        await driver_job.scale_to_zero(kube, job, namespace, hooks.config.functions)
        await reporter.write(st.suspended(conditions, view.steps_done, generation))
    elif action is Action.BUDGET:  # raising spec.budget is a spec change: a new driver
        assert job is not None
        await driver_job.scale_to_zero(kube, job, namespace, hooks.config.functions)
        await reporter.write(st.budget_exceeded(conditions, view.steps_done,
                                                spend.budget.message, generation,
                                                cost=spend.status))
    elif action is Action.SUCCEEDED:
        await reporter.write(st.succeeded(conditions, view.steps_done, generation))
    elif action is Action.START:
        assert job is not None and desired is not None
        await driver_job.start(kube, name, desired, obs.progress)
        await reporter.write(st.started(conditions, state.services, driver_name(name),
                                        view.steps_done, job.spec.steps, generation,
                                        has_budget=job.spec.budget.limited))
        return True
    return False  # WATCH, WAIT: the driver works; its progress is reported as it comes
