"""The operator's side of a job's driver pod: observe it, start it, stop it.

Only API objects: the driver Job's state (running, stopping, finished, from which spec) and
the progress its pod publishes. Nothing here reads a file or a model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from rlhfless.api.progress import PROGRESS_KEY, Progress, parse_progress
from rlhfless.api.spec import RLHFJob
from rlhfless.knative.driver import driver_name, progress_name
from rlhfless.knative.kube import SPEC_HASH, Kube, parse_time, spec_hash, with_hash
from rlhfless.knative.pods import FunctionSettings
from rlhfless.knative.services import scale_patch, service_name
from rlhfless.operator.decide import DriverState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observation:
    driver: DriverState
    current: bool  # the Job was built from the desired manifest (spec and settings)
    uid: str | None  # of the driver Job, to judge each finished run once
    failed: bool  # finished with an error
    message: str  # why a failed run ended
    progress: Progress
    started_at: float | None = None  # when the driver Job's pod started (status.startTime)


def _condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def _start_time(job: dict[str, Any]) -> float | None:
    try:
        return parse_time((job.get("status") or {}).get("startTime"))
    except ValueError:
        return None


async def observe(kube: Kube, namespace: str, name: str,
                  desired: dict[str, Any] | None) -> Observation:
    """The driver Job and the driver's progress, as the daemon decides on them."""
    job = await kube.get("Job", namespace, driver_name(name))
    progress = parse_progress(await kube.read_config_map(namespace, progress_name(name)))
    if job is None:
        return Observation(DriverState.ABSENT, True, None, False, "", progress)
    meta = job.get("metadata", {})
    annotations = meta.get("annotations") or {}
    current = desired is not None and annotations.get(SPEC_HASH) == spec_hash(desired)
    if meta.get("deletionTimestamp"):
        return Observation(DriverState.STOPPING, current, meta.get("uid"), False, "", progress,
                           _start_time(job))
    failed = _condition(job, "Failed")
    status = job.get("status") or {}
    started_at = _start_time(job)
    if failed is None and _condition(job, "Complete") is None and not status.get("succeeded"):
        return Observation(DriverState.RUNNING, current, meta.get("uid"), False, "", progress,
                           started_at)
    message = ""
    if failed is not None:
        if progress.state == "failed" and progress.error:
            message = progress.error
        else:  # the pod died without its own report (killed, evicted, out of memory)
            message = (f"driver pod ended without a report ({failed.get('reason', 'Failed')}: "
                       f"{failed.get('message', '')}); see the logs of job/{driver_name(name)}")
    return Observation(DriverState.FINISHED, current, meta.get("uid"), failed is not None,
                       message, progress, started_at)


async def start(kube: Kube, name: str, desired: dict[str, Any], progress: Progress) -> None:
    """Create the driver Job of job `name`. Its progress is reset first (keeping the
    checkpointed step and the last steps), so what the ConfigMap says next is this run's."""
    meta = desired["metadata"]
    fresh = progress.model_copy(update={"state": "starting", "error": None, "notice": None})
    await kube.write_config_map(meta["namespace"], progress_name(name),
                                {PROGRESS_KEY: fresh.dump()})
    created = await kube.create(with_hash(desired))
    if created is None:
        log.info("driver Job %s exists already", meta["name"])


async def stop(kube: Kube, namespace: str, name: str) -> None:
    """Delete the driver Job, Foreground: the Job stays until its pod has finished the step
    in flight and exited, so no second driver starts before."""
    await kube.delete("Job", namespace, driver_name(name), propagation="Foreground")


async def scale_to_zero(kube: Kube, job: RLHFJob, namespace: str,
                        settings: FunctionSettings) -> None:
    """What a driver does when it stops, for a driver that could not (killed)."""
    for stage in job.spec.stages.deployed:
        try:
            await kube.patch_service(namespace, service_name(job.metadata.name, stage),
                                     scale_patch(job, stage, 0, settings))
        except Exception as exc:  # noqa: BLE001 - a Service may be gone or not yet there
            log.warning("scaling %s of %s to zero failed: %s", stage, job.metadata.name, exc)
