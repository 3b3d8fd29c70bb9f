"""The chart's RBAC grants exactly what the operator calls, and no more than its mode needs.

`rlhfless.operator.rbac.OPERATOR_RULES` is derived from the code path: the operator's kmock
integration test records every (apiGroup, resource, verb) request the real kopf operator
makes and checks it against that list (tests/test_operator_kmock.py), in cluster-wide and
namespaced mode. Here the rendered ClusterRole (cluster-wide) or Role (with
operator.watchNamespace) is compared with the same list, so a new API call in the operator
fails one of the two tests until both the list and the chart grant it.
"""

from __future__ import annotations

from typing import Any

from helm_chart import NON_DEFAULT_VALUES, by_kind, one, render

from rlhfless.operator.main import operator_kwargs
from rlhfless.operator.rbac import NAMESPACED_RULES, OPERATOR_RULES, ApiCall, role_rules


def granted(role: dict[str, Any]) -> set[ApiCall]:
    out: set[ApiCall] = set()
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, rule  # no resourceNames/urls
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


def test_clusterwide_role_is_exactly_the_operator_rules() -> None:
    assert operator_kwargs(None, None)["clusterwide"] is True
    docs = render()
    role = one(docs, "ClusterRole")
    assert granted(role) == OPERATOR_RULES, (
        f"missing: {sorted(OPERATOR_RULES - granted(role))}; "
        f"extra: {sorted(granted(role) - OPERATOR_RULES)}")
    # Same shape as rbac.role_rules(): one rule per (apiGroup, resource).
    assert role["rules"] == role_rules(OPERATOR_RULES)
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")


def test_namespaced_mode_uses_only_a_role_in_the_watched_namespace() -> None:
    assert operator_kwargs("ml-team", None)["clusterwide"] is False
    docs = render(NON_DEFAULT_VALUES)
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    role, binding = one(docs, "Role"), one(docs, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "ml-team"
    assert granted(role) == NAMESPACED_RULES
    assert role["rules"] == role_rules(NAMESPACED_RULES)
    # Nothing cluster-scoped can be granted by a Role anyway: none is asked for.
    assert not {r for r in granted(role) if r[1] in ("customresourcedefinitions",
                                                     "namespaces", "nodes")}


def test_role_has_no_wildcards_reads_of_secrets_or_escalation_verbs() -> None:
    for values in ({}, NON_DEFAULT_VALUES):
        for role in by_kind(render(values), "ClusterRole") + by_kind(render(values), "Role"):
            for group, resource, verb in granted(role):
                assert "*" not in (group, resource, verb)
                assert verb not in ("escalate", "bind", "impersonate", "deletecollection")
                assert resource not in ("clusterroles", "clusterrolebindings",
                                        "serviceaccounts/token", "pods/exec")
                if resource == "secrets":
                    assert verb == "create"  # each job's token; never read, list or watch


def test_rbac_can_be_left_to_the_cluster_admin() -> None:
    for values in ({"rbac": {"create": False}},
                   {"rbac": {"create": False}, "operator": {"watchNamespace": "ml"}}):
        docs = render(values)
        for kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
            assert not by_kind(docs, kind)
        assert one(docs, "ServiceAccount")  # the Deployment still runs as its own account
