"""Thin async adapters over kubernetes_asyncio for the few calls the operator and the
driver pods make.

Everything is plain dicts in and out. Never a blocking client here: the operator shares its
event loop with kopf (and, in tests, with the in-process API emulator).

How the operator applies each kind of child (`APPLY`): objects whose content follows the
spec are reconciled (created, or patched when the hash of what we manage changed); objects
fixed for the job's life are only ever created (the token's Secret is never read back, so
the operator needs no right to read Secrets); the driver's Job is created and deleted by the
job's daemon, never patched (a Job's pod template is immutable).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from rlhfless.api.crd import PLURAL, VERSION
from rlhfless.api.spec import API_GROUP

KNATIVE_GROUP = "serving.knative.dev"
KNATIVE_VERSION = "v1"
SPEC_HASH = "rlhfless.io/spec-hash"
MERGE_PATCH = "application/merge-patch+json"


_NOT_CONTENT = ("apiVersion", "kind", "metadata", "status")
RECONCILE, CREATE_ONLY, DAEMON = "reconcile", "create-only", "daemon"
# kind → (API group, version, plural, how the operator applies it)
KINDS: dict[str, tuple[str, str, str, str]] = {
    "Service": (KNATIVE_GROUP, KNATIVE_VERSION, "services", RECONCILE),
    "Role": ("rbac.authorization.k8s.io", "v1", "roles", RECONCILE),
    "NetworkPolicy": ("networking.k8s.io", "v1", "networkpolicies", RECONCILE),
    "Secret": ("", "v1", "secrets", CREATE_ONLY),
    "ServiceAccount": ("", "v1", "serviceaccounts", CREATE_ONLY),
    "RoleBinding": ("rbac.authorization.k8s.io", "v1", "rolebindings", CREATE_ONLY),
    "ConfigMap": ("", "v1", "configmaps", CREATE_ONLY),  # its data is the driver's
    "Job": ("batch", "v1", "jobs", DAEMON),
}


_AS_DICT = {200: "object", 201: "object", 202: "object"}


def _content(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in _NOT_CONTENT}


def spec_hash(obj: dict[str, Any]) -> str:
    """Digest of what we manage in a child (labels, owners, content), for skip-if-unchanged."""
    meta = obj.get("metadata", {})
    managed = {"labels": meta.get("labels"), "owners": meta.get("ownerReferences"),
               **_content(obj)}
    return hashlib.sha256(json.dumps(managed, sort_keys=True).encode()).hexdigest()[:16]


def with_hash(desired: dict[str, Any]) -> dict[str, Any]:
    meta = desired["metadata"]
    return {**desired, "metadata": {**meta, "annotations": {
        **meta.get("annotations", {}), SPEC_HASH: spec_hash(desired)}}}


def parse_time(value: Any) -> float | None:
    """RFC 3339 string (or datetime) to epoch seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


class Kube:
    """The API as the operator and the driver pods use it: jobs' status and the children."""

    def __init__(self, api: client.ApiClient, timeout_s: float = 60.0):
        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.timeout_s = timeout_s  # a hung connection must not hang a driver or a daemon

    # -- any child of a job, by kind -----------------------------------------------------
    def _path(self, kind: str, namespace: str, name: str | None = None) -> str:
        group, version, plural, _ = KINDS[kind]
        base = "/api/v1" if group == "" else f"/apis/{group}/{version}"
        path = f"{base}/namespaces/{namespace}/{plural}"
        return f"{path}/{name}" if name else path

    async def _call(self, method: str, path: str, body: Any = None,
                    query: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": (
            MERGE_PATCH if method == "PATCH" else "application/json")}
        return await self.api.call_api(
            path, method, query_params=query or [], header_params=headers, body=body,
            auth_settings=["BearerToken"], response_types_map=_AS_DICT,
            _return_http_data_only=True, _request_timeout=self.timeout_s) or {}

    async def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create `obj`; None if it already exists (409)."""
        meta = obj["metadata"]
        try:
            return await self._call("POST", self._path(obj["kind"], meta["namespace"]), obj)
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("GET", self._path(kind, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def patch(self, kind: str, namespace: str, name: str,
                    patch: dict[str, Any]) -> dict[str, Any]:
        return await self._call("PATCH", self._path(kind, namespace, name), patch)

    async def delete(self, kind: str, namespace: str, name: str,
                     propagation: str = "Foreground") -> bool:
        """Delete (Foreground: the object stays until its dependents, e.g. a Job's pods,
        are gone); False if it was not there."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        try:
            await self._call("DELETE", self._path(kind, namespace, name), body)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    async def apply(self, desired: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        """Create, or bring what we manage up to date (KINDS says how). (object, verb)."""
        kind, meta = desired["kind"], desired["metadata"]
        mode = KINDS[kind][3]
        body = with_hash(desired) if mode == RECONCILE else desired
        created = await self.create(body)
        if created is not None:
            return created, "created"
        if mode != RECONCILE:
            return None, "exists"
        existing = await self.get(kind, meta["namespace"], meta["name"])
        if existing is None:  # deleted between our create and get: next reconcile retries
            raise RuntimeError(f"{kind} {meta['name']} vanished during apply")
        current = existing.get("metadata", {}).get("annotations", {}) or {}
        if current.get(SPEC_HASH) == body["metadata"]["annotations"][SPEC_HASH]:
            return existing, "unchanged"
        patch = {"metadata": {"labels": meta.get("labels", {}),
                              "annotations": body["metadata"]["annotations"],
                              "ownerReferences": meta.get("ownerReferences", [])},
                 **_content(desired)}
        return await self.patch(kind, meta["namespace"], meta["name"], patch), "patched"

    # -- Knative Services (the driver's runtime) -----------------------------------------
    async def get_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.get("Service", namespace, name)

    async def patch_service(self, namespace: str, name: str,
                            patch: dict[str, Any]) -> dict[str, Any]:
        return await self.patch("Service", namespace, name, patch)

    # -- RLHFJob status ------------------------------------------------------------------
    async def patch_job_status(self, namespace: str, name: str,
                               status: dict[str, Any]) -> None:
        try:
            await self.custom.patch_namespaced_custom_object_status(
                API_GROUP, VERSION, namespace, PLURAL, name, {"status": status},
                _content_type=MERGE_PATCH, _request_timeout=self.timeout_s)
        except ApiException as exc:
            if exc.status != 404:  # the job is being deleted: nothing left to report to
                raise

    # -- pods ----------------------------------------------------------------------------
    async def list_pods(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        """Pods carrying all `labels` (re-checked here: label selectors are cheap to trust
        but some API emulators ignore them)."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        pods = await self.core.list_namespaced_pod(namespace, label_selector=selector,
                                                   _request_timeout=self.timeout_s)
        out = []
        for pod in pods.items:
            raw = self.api.sanitize_for_serialization(pod)
            have = raw.get("metadata", {}).get("labels") or {}
            if all(have.get(k) == v for k, v in labels.items()):
                out.append(raw)
        return out

    # -- the driver's progress (its pod writes, the operator reads) ------------------------
    async def read_config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        obj = await self.get("ConfigMap", namespace, name)
        return None if obj is None else dict(obj.get("data") or {})

    async def write_config_map(self, namespace: str, name: str, data: dict[str, str]) -> None:
        await self.patch("ConfigMap", namespace, name, {"data": data})


async def cluster_api_client(user_agent: str = "rlhfless") -> client.ApiClient:
    """In-cluster service account, else the developer's kubeconfig (or $KUBECONFIG)."""
    from kubernetes_asyncio import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        await config.load_kube_config()
    api = client.ApiClient()
    api.user_agent = user_agent  # tells the operator's calls from the drivers' in audit logs
    return api
