"""The chart's ClusterRole grants exactly what the operator calls.

`rlhfless.operator.rbac.OPERATOR_RULES` is derived from the code path: the operator's kmock
integration test records every (apiGroup, resource, verb) request the real kopf operator
makes and checks it against that list (tests/test_operator_kmock.py). Here the rendered
ClusterRole is compared with the same list, so a new API call in the operator fails one of
the two tests until both the list and the chart grant it.
"""

from __future__ import annotations

from typing import Any

from helm_chart import NON_DEFAULT_VALUES, by_kind, one, render

from rlhfless.operator.main import operator_kwargs
from rlhfless.operator.rbac import OPERATOR_RULES, ApiCall, cluster_role_rules

# kopf lists/watches namespaces only when it is not clusterwide (kopf 1.45
# _core/reactor/observation.py: namespace_observer skips the listing when clusterwide).
NAMESPACE_RULES = frozenset(r for r in OPERATOR_RULES if r[:2] == ("", "namespaces"))


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
    role = one(render(), "ClusterRole")
    expected = OPERATOR_RULES - NAMESPACE_RULES
    assert granted(role) == expected, (
        f"missing: {sorted(expected - granted(role))}; extra: {sorted(granted(role) - expected)}")
    # Same shape as rbac.cluster_role_rules(): one rule per (apiGroup, resource).
    assert role["rules"] == cluster_role_rules(expected)


def test_namespaced_role_adds_only_the_namespace_watch() -> None:
    assert operator_kwargs("ml-team", None)["clusterwide"] is False
    role = one(render(NON_DEFAULT_VALUES), "ClusterRole")
    assert {("", "namespaces", "list"), ("", "namespaces", "watch")} == NAMESPACE_RULES
    assert granted(role) == set(OPERATOR_RULES)
    assert role["rules"] == cluster_role_rules(OPERATOR_RULES)


def test_role_has_no_wildcards_or_escalation_verbs() -> None:
    for values in ({}, NON_DEFAULT_VALUES):
        for group, resource, verb in granted(one(render(values), "ClusterRole")):
            assert "*" not in (group, resource, verb)
            assert verb not in ("escalate", "bind", "impersonate", "deletecollection")
            assert resource not in ("secrets", "clusterroles", "roles", "rolebindings",
                                    "clusterrolebindings", "serviceaccounts/token")


def test_rbac_can_be_left_to_the_cluster_admin() -> None:
    docs = render({"rbac": {"create": False}})
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    assert one(docs, "ServiceAccount")  # the Deployment still runs as its own account
