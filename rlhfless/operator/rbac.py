"""What the operator may call on the Kubernetes API: one list, checked against real calls.

`OPERATOR_RULES` is the RBAC the operator needs, as (apiGroup, resource, verb) triples; the
Helm chart grants exactly these (`role_rules()` renders them): as a ClusterRole when the
operator watches the whole cluster, as a Role in the watched namespace otherwise (then kopf
does not scan cluster-scoped objects, so `CLUSTER_SCOPED` is left out). The in-process
operator tests record every request the operator makes and check it stays inside these
rules; `NOT_SEEN_IN_TESTS` names the few only a real cluster exercises. `DELEGATED` are
rights the operator never uses itself but must hold to grant them to a job's driver
(Kubernetes refuses to let anyone create a Role granting more than they hold).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from rlhfless.knative.driver import DRIVER_RULES

ApiCall = tuple[str, str, str]  # (apiGroup, resource or resource/subresource, verb)

_JOBS = "rlhfless.io"
_KNATIVE = "serving.knative.dev"
_RBAC = "rbac.authorization.k8s.io"

CALLED: frozenset[ApiCall] = frozenset({
    # The custom resource: kopf watches it, patches annotations/finalizers on it.
    (_JOBS, "rlhfjobs", "list"),
    (_JOBS, "rlhfjobs", "watch"),
    (_JOBS, "rlhfjobs", "patch"),
    # Progress goes through the status subresource only.
    (_JOBS, "rlhfjobs/status", "patch"),
    # Setting blockOwnerDeletion on children needs this where the
    # OwnerReferencesPermissionEnforcement admission plugin is on.
    (_JOBS, "rlhfjobs/finalizers", "update"),
    # The stage functions: get-or-create, patch on spec changes and to scale to zero.
    (_KNATIVE, "services", "get"),
    (_KNATIVE, "services", "create"),
    (_KNATIVE, "services", "patch"),
    # The driver: its Job (created, watched, deleted to stop it), identity and progress.
    ("batch", "jobs", "create"),
    ("batch", "jobs", "get"),
    ("batch", "jobs", "delete"),
    ("", "serviceaccounts", "create"),
    (_RBAC, "roles", "create"),
    (_RBAC, "roles", "get"),
    (_RBAC, "roles", "patch"),
    (_RBAC, "rolebindings", "create"),
    ("", "configmaps", "create"),
    ("", "configmaps", "get"),
    ("", "configmaps", "patch"),  # the progress is reset before each driver run
    # The job's function token: created once, never read back.
    ("", "secrets", "create"),
    ("networking.k8s.io", "networkpolicies", "create"),
    ("networking.k8s.io", "networkpolicies", "get"),
    ("networking.k8s.io", "networkpolicies", "patch"),
    # kopf: events about handler progress.
    ("", "events", "create"),
})

DELEGATED: frozenset[ApiCall] = DRIVER_RULES - CALLED

# kopf's resource discovery (only when it watches the whole cluster).
CLUSTER_SCOPED: frozenset[ApiCall] = frozenset({
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
})

OPERATOR_RULES: frozenset[ApiCall] = CALLED | DELEGATED | CLUSTER_SCOPED
NAMESPACED_RULES: frozenset[ApiCall] = OPERATOR_RULES - CLUSTER_SCOPED

NOT_SEEN_IN_TESTS: frozenset[ApiCall] = DELEGATED | frozenset({
    (_JOBS, "rlhfjobs/finalizers", "update"),  # an admission check, not a request
    ("", "events", "create"),  # posted asynchronously; may not flush in a short test
})


def role_rules(calls: Iterable[ApiCall] = OPERATOR_RULES) -> list[dict[str, Any]]:
    """Role or ClusterRole `rules`: one rule per (apiGroup, resource), verbs sorted."""
    verbs: dict[tuple[str, str], set[str]] = defaultdict(set)
    for group, resource, verb in calls:
        verbs[(group, resource)].add(verb)
    return [
        {"apiGroups": [group], "resources": [resource], "verbs": sorted(vs)}
        for (group, resource), vs in sorted(verbs.items())
    ]
