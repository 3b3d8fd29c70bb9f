"""What the operator may call on the Kubernetes API: one list, checked against real calls.

`OPERATOR_RULES` is the RBAC the operator needs, as (apiGroup, resource, verb) triples; the
Helm ClusterRole should grant exactly these (`cluster_role_rules()` renders them). The
in-process operator tests record every request the operator makes and check it stays inside
these rules; `NOT_SEEN_IN_TESTS` names the few rules only a real cluster
exercises.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

ApiCall = tuple[str, str, str]  # (apiGroup, resource or resource/subresource, verb)

_JOBS = "rlhfless.io"
_KNATIVE = "serving.knative.dev"

OPERATOR_RULES: frozenset[ApiCall] = frozenset({
    # The custom resource: kopf watches it, patches annotations/finalizers on it.
    (_JOBS, "rlhfjobs", "list"),
    (_JOBS, "rlhfjobs", "watch"),
    (_JOBS, "rlhfjobs", "patch"),
    # Progress goes through the status subresource only.
    (_JOBS, "rlhfjobs/status", "patch"),
    # Setting blockOwnerDeletion on children needs this where the
    # OwnerReferencesPermissionEnforcement admission plugin is on.
    (_JOBS, "rlhfjobs/finalizers", "update"),
    # The stage functions: get-or-create, scale by patching annotations, read URL/readiness.
    (_KNATIVE, "services", "get"),
    (_KNATIVE, "services", "create"),
    (_KNATIVE, "services", "patch"),
    # Metering: pod lifetimes of each stage's revisions. The same list gives the pod IPs the
    # Knative runtime calls a streaming actor at directly (`invoke_instance`): no new verb.
    ("", "pods", "list"),
    # kopf: events about handler progress, and discovery of CRDs/namespaces.
    ("", "events", "create"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
})

NOT_SEEN_IN_TESTS: frozenset[ApiCall] = frozenset({
    (_JOBS, "rlhfjobs/finalizers", "update"),  # an admission check, not a request
    ("", "events", "create"),  # posted asynchronously; may not flush in a short test
    ("", "namespaces", "list"),  # only with --namespace (namespace-restricted kopf)
    ("", "namespaces", "watch"),
})

def cluster_role_rules(calls: Iterable[ApiCall] = OPERATOR_RULES) -> list[dict[str, Any]]:
    """ClusterRole `rules`: one rule per (apiGroup, resource), verbs sorted."""
    verbs: dict[tuple[str, str], set[str]] = defaultdict(set)
    for group, resource, verb in calls:
        verbs[(group, resource)].add(verb)
    return [
        {"apiGroups": [group], "resources": [resource], "verbs": sorted(vs)}
        for (group, resource), vs in sorted(verbs.items())
    ]
