"""Turn recorded API requests into RBAC triples, to check them against OPERATOR_RULES."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rlhfless.operator.rbac import ApiCall

_VERBS = {"list": "list", "watch": "watch", "fetch": "get", "create": "create",
          "delete": "delete"}


def api_call(action: str | None, method: str, group: str | None, plural: str | None,
             subresource: str | None, name: str | None) -> ApiCall | None:
    """One request as an RBAC triple; None for discovery and other non-resource URLs."""
    if not action or plural is None or group is None:
        return None
    action = action.lower()
    verb = _VERBS.get(action)
    if action == "update":
        verb = "patch" if method.upper() == "PATCH" else "update"
    if action == "delete" and name is None:
        verb = "deletecollection"
    if verb is None:
        return None
    resource = f"{plural}/{subresource}" if subresource else plural
    return (group, resource, verb)


def api_calls(requests: Iterable[Any]) -> set[ApiCall]:
    """RBAC triples of recorded requests (kmock `Request` objects, or anything with
    `.action`, `.method`, `.resource.group/.plural`, `.subresource`, `.name`)."""
    calls = set()
    for req in requests:
        resource = getattr(req, "resource", None)
        action = getattr(req, "action", None)
        call = api_call(
            getattr(action, "value", action),
            str(getattr(getattr(req, "method", None), "value", req.method or "")),
            getattr(resource, "group", None),
            getattr(resource, "plural", None),
            getattr(req, "subresource", None),
            getattr(req, "name", None),
        )
        if call is not None:
            calls.add(call)
    return calls
