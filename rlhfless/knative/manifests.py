"""Every object the operator creates for one RLHFJob, as plain data.

`rlhfless manifests JOB.yaml` prints exactly this list (like `helm template`), and the
operator applies it: one builder, so what a user reads is what a cluster gets. The driver's
Job comes last: the operator creates it only while the job should run (`operator.decide`).
"""

from __future__ import annotations

from typing import Any

from rlhfless.api.spec import RLHFJob
from rlhfless.cost.prices import CostDefaults
from rlhfless.knative.driver import (
    build_driver_job,
    build_progress_config_map,
    build_role,
    build_role_binding,
    build_service_account,
)
from rlhfless.knative.isolation import build_network_policy, build_token_secret
from rlhfless.knative.pods import FunctionSettings
from rlhfless.knative.services import build_services

DRIVER_KIND = "Job"


def job_manifests(job: RLHFJob, *, namespace: str, uid: str,
                  settings: FunctionSettings | None = None,
                  token: str | None = None,
                  cost: CostDefaults | None = None) -> list[dict[str, Any]]:
    """The job's children, in the order the operator applies them (the token's Secret
    before the pods that read it; the driver's identity before the driver). `cost` is the
    cluster's price table, handed to the driver."""
    settings = settings or FunctionSettings()
    where = {"namespace": namespace, "uid": uid}
    return [
        build_token_secret(job, token=token, **where),
        build_network_policy(job, settings=settings, **where),
        build_service_account(job, **where),
        build_role(job, **where),
        build_role_binding(job, **where),
        build_progress_config_map(job, **where),
        *build_services(job, settings=settings, **where),
        build_driver_job(job, settings=settings, cost=cost, **where),
    ]
