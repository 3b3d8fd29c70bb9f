"""An in-process Kubernetes API (kmock) for running the real operator in tests.

    async with emulated_cluster() as cluster, cluster.operator(hooks):
        await cluster.create_job("demo", {"steps": 2})
        await cluster.wait_for(lambda: cluster.phase("demo") == "Succeeded")
    cluster.api_calls()  # {(apiGroup, resource, verb), ...} the operator used

kmock stores objects and streams watch events but is not a full API server, so this module
adds what the operator relies on from a real one: uids, generations bumped on spec changes,
a constant resourceVersion (kopf's JSON patches test it), and owner-reference garbage
collection (`collect_garbage`). Needs the `kmock` test dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kmock
import kopf
from kubernetes_asyncio import client
from rbac_recorder import ApiCall, api_calls

from rlhfless.api.crd import PLURAL, VERSION
from rlhfless.api.spec import API_GROUP, API_VERSION, KIND
from rlhfless.operator.config import Hooks
from rlhfless.operator.main import serve

JOBS = f"{API_GROUP}/{VERSION}/{PLURAL}"
KSVC = "serving.knative.dev/v1/services"
PODS = "v1/pods"
OWNED_KINDS = (KSVC, PODS, "v1/configmaps")

_RESOURCES: dict[str, kmock.ResourceInfo] = {
    JOBS: kmock.ResourceInfo(kind=KIND, namespaced=True, subresources={"status"},
                             shortnames={"rj"},
                             verbs={"get", "list", "watch", "create", "patch", "delete"}),
    KSVC: kmock.ResourceInfo(kind="Service", namespaced=True, shortnames={"ksvc"},
                             verbs={"get", "list", "watch", "create", "patch", "delete"}),
    PODS: kmock.ResourceInfo(kind="Pod", namespaced=True,
                             verbs={"get", "list", "watch", "create", "delete"}),
    "v1/configmaps": kmock.ResourceInfo(kind="ConfigMap", namespaced=True,
                                        verbs={"get", "list", "create", "patch", "delete"}),
    "v1/events": kmock.ResourceInfo(kind="Event", namespaced=True, verbs={"create"}),
    # kopf waits for namespaces to be discoverable before it starts watching.
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", namespaced=False,
                                        verbs={"get", "list", "watch"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs={"get", "list", "watch"}),
}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Cluster:
    emulator: kmock.KubernetesEmulator
    server: kmock.Server
    namespace: str = "default"
    _http: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return str(self.server.url).rstrip("/")

    # -- connecting ----------------------------------------------------------------------
    def login(self, **_: Any) -> kopf.ConnectionInfo:
        """A kopf login handler for this cluster."""
        return kopf.ConnectionInfo(server=self.url)

    async def api_client(self) -> client.ApiClient:
        return client.ApiClient(client.Configuration(host=self.url))

    def hooks(self, **overrides: Any) -> Hooks:
        """Operator hooks talking to this cluster (override runtime/driver/config)."""
        return Hooks(login=self.login, api_client=self.api_client, **overrides)

    @contextlib.asynccontextmanager
    async def operator(self, hooks: Hooks,
                       stop_grace_s: float = 0.5) -> AsyncIterator[asyncio.Task[None]]:
        """Run the real kopf operator in this event loop until the block exits."""
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(serve(hooks, stop_flag=stop, ready_flag=ready))
        try:
            await asyncio.wait_for(ready.wait(), 30)
            yield task
        finally:
            stop.set()
            # kopf gives tasks spawned during its run 5 s to finish; here those include the
            # emulator's own watch-stream handlers, which only end when cancelled.
            done, _ = await asyncio.wait({task}, timeout=stop_grace_s)
            if not done:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- the API, as a user or a controller would use it ---------------------------------
    async def _request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with self.server.client.request(method, path, json=body, headers=headers) as resp:
            data = await resp.json()
            if resp.status >= 400:
                raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {data.get('message')}")
            return data

    def _jobs_path(self, namespace: str | None, name: str | None = None) -> str:
        path = f"/apis/{API_GROUP}/{VERSION}/namespaces/{namespace or self.namespace}/{PLURAL}"
        return f"{path}/{name}" if name else path

    async def create_job(self, name: str, spec: dict[str, Any],
                         namespace: str | None = None) -> dict[str, Any]:
        body = {
            "apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": name, "namespace": namespace or self.namespace,
                         "uid": str(uuid.uuid4()), "generation": 1, "resourceVersion": "1",
                         "creationTimestamp": _now()},
            "spec": spec,
        }
        return await self._request("POST", self._jobs_path(namespace), body)

    async def patch_job_spec(self, name: str, spec_patch: dict[str, Any],
                             namespace: str | None = None) -> dict[str, Any]:
        """Merge-patch the spec and bump metadata.generation, as the API server does."""
        current = self.job(name, namespace) or {}
        generation = int(current.get("metadata", {}).get("generation", 1)) + 1
        return await self._request("PATCH", self._jobs_path(namespace, name),
                                   {"metadata": {"generation": generation},
                                    "spec": spec_patch})

    async def delete_job(self, name: str, namespace: str | None = None) -> None:
        await self._request("DELETE", self._jobs_path(namespace, name))

    async def create_object(self, resource: str, obj: dict[str, Any]) -> None:
        """Store an object directly (pods, as the kubelet's world would have them)."""
        group_version, plural = resource.rsplit("/", 1)
        ns = obj["metadata"].get("namespace", self.namespace)
        prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        await self._request("POST", f"{prefix}/namespaces/{ns}/{plural}", obj)

    def set_object(self, resource: str, obj: dict[str, Any]) -> None:
        """Replace an object's stored state without a request (status a controller writes)."""
        meta = obj["metadata"]
        key = (kmock.resource(resource), meta.get("namespace", self.namespace), meta["name"])
        self.emulator.objects[key] = obj

    # -- reading state -------------------------------------------------------------------
    def get(self, resource: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        key = (kmock.resource(resource), namespace or self.namespace, name)
        if key not in self.emulator.objects or self.emulator.objects[key].deleted:
            return None
        return self.emulator.objects[key].raw

    def list(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        wanted = kmock.resource(resource)
        return [obj.raw for (res, ns, _), obj in list(self.emulator.objects.items())
                if res == wanted and not obj.deleted and ns == (namespace or self.namespace)]

    def job(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        return self.get(JOBS, name, namespace)

    def status(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        return (self.job(name, namespace) or {}).get("status") or {}

    def phase(self, name: str, namespace: str | None = None) -> str | None:
        return self.status(name, namespace).get("phase")

    def services(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.list(KSVC, namespace)

    def api_calls(self) -> set[ApiCall]:
        """Every (apiGroup, resource, verb) requested so far, by anyone. Requests this
        module makes as a user/kubelet are excluded via their User-Agent."""
        return api_calls(r for r in self.emulator
                         if not str(r.headers.get("User-Agent", "")).startswith("kmock/"))

    # -- what a real cluster's controllers would do --------------------------------------
    def collect_garbage(self) -> list[tuple[str, str]]:
        """Delete objects whose owner references all point to vanished owners (the garbage
        collector's job). Returns (resource, name) of what it deleted."""
        live_uids = {obj.raw["metadata"].get("uid") for obj in self.emulator.objects.values()
                     if not obj.deleted}
        deleted = []
        for (res, _ns, name), obj in list(self.emulator.objects.items()):
            if obj.deleted:
                continue
            owners = obj.raw.get("metadata", {}).get("ownerReferences") or []
            if owners and not any(o.get("uid") in live_uids for o in owners):
                obj.delete()
                deleted.append((f"{res.group}/{res.version}/{res.plural}".lstrip("/"), name))
        return deleted

    def knative_reconcile(self, url: str) -> None:
        """One pass of what Knative would do for each Service: set its URL and Ready
        condition, and run as many pods as its min-scale asks (at least one)."""
        for svc in self.services():
            meta = svc["metadata"]
            if not (svc.get("status") or {}).get("url"):
                svc = {**svc, "status": {"url": url, "observedGeneration": 1, "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": _now()}]}}
                self.set_object(KSVC, svc)
            template = svc["spec"]["template"]
            annotations = template.get("metadata", {}).get("annotations") or {}
            wanted = max(1, int(annotations.get("autoscaling.knative.dev/min-scale", "0")))
            for i in range(wanted):
                pod_name = f"{meta['name']}-00001-deployment-{i}"
                if self.get(PODS, pod_name, meta.get("namespace")) is not None:
                    continue
                container = template["spec"]["containers"][0]
                self.set_object(PODS, {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod_name, "namespace": meta.get("namespace"),
                                 "uid": str(uuid.uuid4()), "creationTimestamp": _now(),
                                 "labels": {**(template["metadata"].get("labels") or {}),
                                            "serving.knative.dev/service": meta["name"]}},
                    "spec": {"containers": [{"name": "user-container",
                                             "image": container["image"],
                                             "resources": container.get("resources", {})}]},
                    "status": {"phase": "Running", "startTime": _now(), "conditions": [
                        {"type": "Ready", "status": "True", "lastTransitionTime": _now()}]},
                })

    async def emulate_knative(self, url: str, interval: float = 0.05) -> None:
        """`knative_reconcile` forever (run it as a task; cancel it when done)."""
        while True:
            self.knative_reconcile(url)
            await asyncio.sleep(interval)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0,
                       interval: float = 0.05, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def emulated_cluster(namespace: str = "default") -> AsyncIterator[Cluster]:
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        for resource, info in _RESOURCES.items():
            emulator.resources[resource] = info
        yield Cluster(emulator, server, namespace)
