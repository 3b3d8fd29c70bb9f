"""Every object the operator creates for one RLHFJob, as plain data.

`rlhfless manifests JOB.yaml` prints exactly this list (like `helm template`), and the
operator applies it: one builder, so what a user reads is what a cluster gets.
"""

from __future__ import annotations

from typing import Any

from rlhfless.api.spec import RLHFJob
from rlhfless.knative.services import FunctionSettings, build_services


def job_manifests(job: RLHFJob, *, namespace: str, uid: str,
                  settings: FunctionSettings | None = None) -> list[dict[str, Any]]:
    """The job's children, in the order the operator applies them."""
    return build_services(job, namespace=namespace, uid=uid, settings=settings)
