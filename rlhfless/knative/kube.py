"""Thin async adapters over kubernetes_asyncio for the few calls the operator makes.

Everything is plain dicts in and out. Never a blocking client here: the operator shares its
event loop with kopf (and, in tests, with the in-process API emulator).
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


def spec_hash(obj: dict[str, Any]) -> str:
    """Digest of what we manage in a child (labels, owners, spec), for skip-if-unchanged."""
    meta = obj.get("metadata", {})
    managed = {"labels": meta.get("labels"), "owners": meta.get("ownerReferences"),
               "spec": obj.get("spec")}
    return hashlib.sha256(json.dumps(managed, sort_keys=True).encode()).hexdigest()[:16]


def parse_time(value: Any) -> float | None:
    """RFC 3339 string (or datetime) to epoch seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


class Kube:
    """The operator's view of the API: jobs' status, Knative Services, pods."""

    def __init__(self, api: client.ApiClient):
        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    # -- Knative Services ----------------------------------------------------------------
    async def apply_service(self, desired: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Get-or-create; patch only when our managed part changed. Returns (object, verb)."""
        meta = desired["metadata"]
        body = {**desired, "metadata": {**meta, "annotations": {
            **meta.get("annotations", {}), SPEC_HASH: spec_hash(desired)}}}
        try:
            created = await self.custom.create_namespaced_custom_object(
                KNATIVE_GROUP, KNATIVE_VERSION, meta["namespace"], "services", body)
            return created, "created"
        except ApiException as exc:
            if exc.status != 409:  # 409: it exists (or a re-run handler raced us): adopt it
                raise
        existing = await self.get_service(meta["namespace"], meta["name"])
        if existing is None:  # deleted between our create and get: next reconcile retries
            raise RuntimeError(f"service {meta['name']} vanished during apply")
        current = existing.get("metadata", {}).get("annotations", {}) or {}
        if current.get(SPEC_HASH) == body["metadata"]["annotations"][SPEC_HASH]:
            return existing, "unchanged"
        patch = {"metadata": {"labels": meta.get("labels", {}),
                              "annotations": body["metadata"]["annotations"],
                              "ownerReferences": meta.get("ownerReferences", [])},
                 "spec": desired["spec"]}
        patched = await self.patch_service(meta["namespace"], meta["name"], patch)
        return patched, "patched"

    async def get_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.custom.get_namespaced_custom_object(
                KNATIVE_GROUP, KNATIVE_VERSION, namespace, "services", name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def patch_service(self, namespace: str, name: str,
                            patch: dict[str, Any]) -> dict[str, Any]:
        return await self.custom.patch_namespaced_custom_object(
            KNATIVE_GROUP, KNATIVE_VERSION, namespace, "services", name, patch,
            _content_type=MERGE_PATCH)

    # -- RLHFJob status ------------------------------------------------------------------
    async def patch_job_status(self, namespace: str, name: str,
                               status: dict[str, Any]) -> None:
        try:
            await self.custom.patch_namespaced_custom_object_status(
                API_GROUP, VERSION, namespace, PLURAL, name, {"status": status},
                _content_type=MERGE_PATCH)
        except ApiException as exc:
            if exc.status != 404:  # the job is being deleted: nothing left to report to
                raise

    # -- pods ----------------------------------------------------------------------------
    async def list_pods(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        """Pods carrying all `labels` (re-checked here: label selectors are cheap to trust
        but some API emulators ignore them)."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        pods = await self.core.list_namespaced_pod(namespace, label_selector=selector)
        out = []
        for pod in pods.items:
            raw = self.api.sanitize_for_serialization(pod)
            have = raw.get("metadata", {}).get("labels") or {}
            if all(have.get(k) == v for k, v in labels.items()):
                out.append(raw)
        return out
