"""An in-process Kubernetes API (kmock) for running the real operator in tests.

    async with emulated_cluster() as cluster, cluster.operator(hooks), \
            cluster.job_controller(run_pod):
        await cluster.create_job("demo", {"steps": 2})
        await cluster.wait_for(lambda: cluster.phase("demo") == "Succeeded")
    cluster.api_calls()  # {(apiGroup, resource, verb), ...} the operator used
    cluster.api_calls(DRIVER_AGENT)  # ... and the driver pods

kmock stores objects and streams watch events but is not a full API server, so this module
adds what the operator relies on from a real one: uids, generations bumped on spec changes,
a constant resourceVersion (kopf's JSON patches test it), owner-reference garbage collection
(`collect_garbage`), Knative's reconciler (`emulate_knative`) and the Job controller with a
kubelet (`job_controller`: one pod per driver Job, run in-process by a test-supplied
coroutine; SIGTERM on deletion, Foreground semantics, SIGKILL on `kill_pod`). Needs the
`kmock` test dependency.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
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
BATCH_JOBS = "batch/v1/jobs"
CONFIGMAPS = "v1/configmaps"
SECRETS = "v1/secrets"
NETPOL = "networking.k8s.io/v1/networkpolicies"
ROLES = "rbac.authorization.k8s.io/v1/roles"
ROLEBINDINGS = "rbac.authorization.k8s.io/v1/rolebindings"
SERVICEACCOUNTS = "v1/serviceaccounts"
DRIVER_AGENT = "rlhfless-driver"  # the User-Agent of driver pods' API clients
POD_FINALIZER = "test.rlhfless.io/pod-running"  # emulates Foreground deletion of a Job
_CRUD = {"get", "list", "watch", "create", "patch", "delete"}

# A driver pod: (the batch Job as created, SIGTERM) → exit code.
PodRunner = Callable[[dict[str, Any], asyncio.Event], Awaitable[int]]

_RESOURCES: dict[str, kmock.ResourceInfo] = {
    BATCH_JOBS: kmock.ResourceInfo(kind="Job", namespaced=True, verbs=_CRUD),
    SECRETS: kmock.ResourceInfo(kind="Secret", namespaced=True, verbs=_CRUD),
    SERVICEACCOUNTS: kmock.ResourceInfo(kind="ServiceAccount", namespaced=True, verbs=_CRUD),
    NETPOL: kmock.ResourceInfo(kind="NetworkPolicy", namespaced=True, verbs=_CRUD),
    ROLES: kmock.ResourceInfo(kind="Role", namespaced=True, verbs=_CRUD),
    ROLEBINDINGS: kmock.ResourceInfo(kind="RoleBinding", namespaced=True, verbs=_CRUD),
    JOBS: kmock.ResourceInfo(kind=KIND, namespaced=True, subresources={"status"},
                             shortnames={"rj"},
                             verbs={"get", "list", "watch", "create", "patch", "delete"}),
    KSVC: kmock.ResourceInfo(kind="Service", namespaced=True, shortnames={"ksvc"},
                             verbs={"get", "list", "watch", "create", "patch", "delete"}),
    PODS: kmock.ResourceInfo(kind="Pod", namespaced=True,
                             verbs={"get", "list", "watch", "create", "delete"}),
    CONFIGMAPS: kmock.ResourceInfo(kind="ConfigMap", namespaced=True, verbs=_CRUD),
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

    async def api_client(self, user_agent: str | None = None) -> client.ApiClient:
        api = client.ApiClient(client.Configuration(host=self.url))
        if user_agent:
            api.user_agent = user_agent
        return api

    def hooks(self, **overrides: Any) -> Hooks:
        """Operator hooks talking to this cluster (override runtime/driver/config)."""
        return Hooks(login=self.login, api_client=self.api_client, **overrides)

    @contextlib.asynccontextmanager
    async def operator(self, hooks: Hooks, stop_grace_s: float = 0.5,
                       namespace: str | None = None) -> AsyncIterator[asyncio.Task[None]]:
        """Run the real kopf operator in this event loop until the block exits (watching
        one `namespace`, or the whole cluster)."""
        before = asyncio.all_tasks()
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(serve(hooks, namespace=namespace, stop_flag=stop,
                                         ready_flag=ready))
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
            await _reap_kopf_leftovers(before)

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

    def api_calls(self, agent: str | None = None) -> set[ApiCall]:
        """Every (apiGroup, resource, verb) the operator requested so far (the driver pods'
        with `agent=DRIVER_AGENT`). Requests this module makes as a user, a controller or
        a kubelet are excluded via their User-Agent."""
        def ours(request: Any) -> bool:
            ua = str(request.headers.get("User-Agent", ""))
            if agent is not None:
                return ua.startswith(agent)
            return not ua.startswith(("kmock/", DRIVER_AGENT))

        return api_calls(r for r in self.emulator if ours(r))

    def all(self, resource: str) -> list[dict[str, Any]]:
        """Objects of `resource` in every namespace."""
        wanted = kmock.resource(resource)
        return [obj.raw for (res, _, _), obj in list(self.emulator.objects.items())
                if res == wanted and not obj.deleted]

    def _stored(self, resource: str, namespace: str, name: str) -> Any:
        key = (kmock.resource(resource), namespace, name)
        if key not in self.emulator.objects:  # an ObjectsArray has no .get
            return None
        obj = self.emulator.objects[key]
        return None if obj.deleted else obj

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
            meta = obj.raw.get("metadata", {})
            owners = meta.get("ownerReferences") or []
            if owners and not any(o.get("uid") in live_uids for o in owners):
                if meta.get("finalizers"):  # held (a Job's running pod): marked, not gone
                    if not meta.get("deletionTimestamp"):
                        obj.patch({"metadata": {"deletionTimestamp": _now()}})
                else:
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

    @contextlib.asynccontextmanager
    async def job_controller(self, run_pod: PodRunner, grace_s: float = 30.0,
                             interval: float = 0.02) -> AsyncIterator[JobController]:
        """The Job controller and kubelet for driver Jobs, until the block exits."""
        controller = JobController(self, run_pod, grace_s)
        task = asyncio.create_task(controller.loop(interval))
        try:
            yield controller
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await controller.shutdown()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0,
                       interval: float = 0.05, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(interval)


def _is_kopf(task: asyncio.Task[Any]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and "/kopf/" in code.co_filename


async def _reap_kopf_leftovers(before: set[asyncio.Task[Any]], timeout: float = 5.0) -> None:
    """Cancel, again and again, kopf's tasks that outlived a forced stop: its per-resource
    scheduler swallows one cancellation in its cleaner and can leave `close()` waiting on
    it forever (then the test's event loop never closes)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        left = [t for t in asyncio.all_tasks() - before if not t.done() and _is_kopf(t)]
        if not left:
            return
        for task in left:
            task.cancel()
        await asyncio.wait(left, timeout=0.1)


@dataclass
class _Pod:
    job: dict[str, Any]
    future: concurrent.futures.Future[int]
    stop: asyncio.Event
    killed: bool = False
    term_at: float | None = None


class JobController:
    """One pod per `batch/v1` Job, run by `run_pod` (backoffLimit 0, as the operator builds
    its drivers). Pods run on their own event loop in a "node" thread, as they would in
    their own process: an operator stopping (which cancels every task it did not find at
    its start) leaves them running. The Job is marked active while the pod runs, then
    Complete or Failed by the pod's exit code; deleting the Job sends the pod SIGTERM (its
    `stop` event) and, after the grace period, SIGKILL (cancellation); the Job object stays
    until the pod is gone (Foreground deletion). `kill_pod` is an OOM kill."""

    def __init__(self, cluster: Cluster, run_pod: PodRunner, grace_s: float):
        self.cluster, self.run_pod, self.grace_s = cluster, run_pod, grace_s
        self.pods: dict[str, _Pod] = {}  # by Job uid
        self.started: list[str] = []  # Job names, in start order
        self.node = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.node.run_forever, name="node",
                                        daemon=True)
        self._thread.start()

    def _patch(self, job: dict[str, Any], changes: dict[str, Any]) -> None:
        meta = job["metadata"]
        obj = self.cluster._stored(BATCH_JOBS, meta["namespace"], meta["name"])
        if obj is not None and obj.raw["metadata"].get("uid") == meta.get("uid"):
            obj.patch(changes)

    def _release(self, job: dict[str, Any]) -> None:
        """The pod is gone: drop our finalizer; a deleted Job disappears now."""
        meta = job["metadata"]
        obj = self.cluster._stored(BATCH_JOBS, meta["namespace"], meta["name"])
        if obj is None or obj.raw["metadata"].get("uid") != meta.get("uid"):
            return
        finalizers = [f for f in obj.raw["metadata"].get("finalizers") or []
                      if f != POD_FINALIZER]
        obj.patch({"metadata": {"finalizers": finalizers}})
        if obj.raw["metadata"].get("deletionTimestamp") and not finalizers:
            obj.delete()

    def _start(self, job: dict[str, Any]) -> None:
        self._patch(job, {"metadata": {"finalizers": [POD_FINALIZER]},
                          "status": {"active": 1, "startTime": _now()}})
        stop = asyncio.Event()
        future = asyncio.run_coroutine_threadsafe(self.run_pod(job, stop), self.node)
        self.pods[job["metadata"]["uid"]] = _Pod(job, future, stop)
        self.started.append(job["metadata"]["name"])

    def _finish(self, pod: _Pod) -> None:
        if pod.future.cancelled():
            code = 137
        elif pod.future.exception() is not None:
            exc = pod.future.exception()
            print(f"driver pod crashed: {type(exc).__name__}: {exc}")
            code = 1
        else:
            code = pod.future.result()
        ok = code == 0 and not pod.killed
        condition = {"type": "Complete" if ok else "Failed", "status": "True",
                     "lastTransitionTime": _now()}
        if not ok:
            condition.update(reason="BackoffLimitExceeded",
                             message=f"Job has reached the specified backoff limit (exit {code})")
        self._patch(pod.job, {"status": {"active": 0, "succeeded" if ok else "failed": 1,
                                         "conditions": [condition]}})
        self._release(pod.job)

    async def loop(self, interval: float) -> None:
        while True:
            now = time.monotonic()
            for job in self.cluster.all(BATCH_JOBS):
                if not job["metadata"].get("uid"):  # the API server assigns one on create
                    meta = job["metadata"]
                    self.cluster._stored(BATCH_JOBS, meta["namespace"], meta["name"]).patch(
                        {"metadata": {"uid": str(uuid.uuid4()), "creationTimestamp": _now()}})
            live = {j["metadata"]["uid"]: j for j in self.cluster.all(BATCH_JOBS)}
            for uid, job in live.items():
                status = job.get("status") or {}
                if uid not in self.pods and not status.get("conditions") and not job[
                        "metadata"].get("deletionTimestamp"):
                    self._start(job)
            for uid, pod in list(self.pods.items()):
                job = live.get(uid)
                if pod.future.done():
                    self._finish(pod)
                    del self.pods[uid]
                    continue
                if job is None or job["metadata"].get("deletionTimestamp"):
                    if pod.term_at is None:
                        pod.term_at = now
                        self.node.call_soon_threadsafe(pod.stop.set)  # SIGTERM
                    elif now - pod.term_at > self.grace_s:
                        pod.future.cancel()  # SIGKILL after the grace period
            await asyncio.sleep(interval)

    def kill_pod(self, job_name: str) -> None:
        """SIGKILL the running pod of a Job (OOM, node loss): the step in flight is lost."""
        for pod in self.pods.values():
            if pod.job["metadata"]["name"] == job_name and not pod.future.done():
                pod.killed = True
                pod.future.cancel()
                return
        raise AssertionError(f"no running pod for Job {job_name}")

    async def shutdown(self) -> None:
        """Kill what still runs (the node's loop drains its tasks), then stop the node."""
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.get_running_loop().shutdown_asyncgens()

        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(drain(), self.node))
        self.node.call_soon_threadsafe(self.node.stop)
        await asyncio.to_thread(self._thread.join, 10)
        self.node.close()


@contextlib.asynccontextmanager
async def emulated_cluster(namespace: str = "default") -> AsyncIterator[Cluster]:
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        for resource, info in _RESOURCES.items():
            emulator.resources[resource] = info
        yield Cluster(emulator, server, namespace)
