"""Driver pods for the emulated Job controller (tests/kmock_cluster.py).

A pod is read from the batch Job the operator created, as a kubelet would: the job from
the container's RLHFJOB_SPEC, the token from the job's Secret, the run and store folders
from the container's args resolved through its volume mount's `subPath` on a local
directory standing for the shared volume. Then either `drive()` runs in-process (with a
test runtime and, for speed, a test driver) or the real `rlhfless driver` command runs as a
subprocess against the emulated API.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from kmock_cluster import DRIVER_AGENT, SECRETS, Cluster, PodRunner

from rlhfless.api.spec import RLHFJob, parse_job
from rlhfless.api.wire import JOB_ENV, TOKEN_ENV
from rlhfless.driver_pod import (
    ConfigMapPublisher,
    DriverFactory,
    drive,
    real_driver,
    with_cluster_prices,
)
from rlhfless.knative.kube import Kube
from rlhfless.runtime.base import Runtime

RuntimeFactory = Callable[[RLHFJob, str, Kube, str, Path, Path],
                          AbstractAsyncContextManager[Runtime]]


class Pod:
    """What a kubelet would hand the driver container of a batch Job."""

    def __init__(self, cluster: Cluster, job_obj: dict[str, Any], volume: Path):
        self.namespace = job_obj["metadata"]["namespace"]
        spec = job_obj["spec"]["template"]["spec"]
        [self.container] = spec["containers"]
        self.spec = spec
        env = self.container["env"]
        self.plain_env = {e["name"]: e["value"] for e in env if "value" in e}
        # As `rlhfless driver` reads it: the job, priced with the prices the operator set.
        self.job = with_cluster_prices(parse_job(json.loads(self.plain_env[JOB_ENV])),
                                       self.plain_env)
        secret_ref = next(e["valueFrom"]["secretKeyRef"] for e in env if e["name"] == TOKEN_ENV)
        secret = cluster.get(SECRETS, secret_ref["name"], self.namespace)
        assert secret is not None, "the driver's Secret must exist before its pod starts"
        self.token = secret["stringData"][secret_ref["key"]]
        args = self.container["args"]
        self.run_dir = self._host_path(args[args.index("--run-dir") + 1], volume)
        self.store_dir = self._host_path(args[args.index("--store") + 1], volume)

    def _host_path(self, in_pod: str, volume: Path) -> Path:
        """A path inside the pod, on the local directory standing for the volume."""
        for mount in self.container["volumeMounts"]:
            root = mount["mountPath"]
            if mount["name"] == "weights" and (in_pod + "/").startswith(root + "/"):
                return volume / mount.get("subPath", "") / Path(in_pod).relative_to(root)
        raise AssertionError(f"{in_pod} is on no volume of the driver pod")


def in_process(cluster: Cluster, volume: Path, runtime_factory: RuntimeFactory,
               driver_factory: DriverFactory = real_driver,
               ready_timeout_s: float = 30.0) -> PodRunner:
    """Pods that run `drive()` in this event loop (the API through the driver's identity)."""
    async def run_pod(job_obj: dict[str, Any], stop: asyncio.Event) -> int:
        pod = Pod(cluster, job_obj, volume)
        async with await cluster.api_client(DRIVER_AGENT) as api:
            # A short timeout: an operator stopping in this process cancels the emulated
            # API server's connection handlers, which can leave a request hanging.
            kube = Kube(api, timeout_s=3.0)
            publish = ConfigMapPublisher(kube, pod.namespace, pod.job.metadata.name)
            async with runtime_factory(pod.job, pod.namespace, kube, pod.token, pod.run_dir,
                                       pod.store_dir) as runtime:
                return await drive(pod.job, runtime, pod.run_dir, pod.store_dir, publish, stop,
                                   ready_timeout_s, make_driver=driver_factory)

    return run_pod


def kubeconfig(cluster: Cluster, path: Path) -> Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": cluster.url}}],
        "users": [{"name": "driver", "user": {"token": "driver-sa-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "driver"}}],
    }))
    return path


def subprocess_pod(cluster: Cluster, volume: Path, logs: list[str]) -> PodRunner:
    """Pods that run the real `rlhfless driver` command in a child process."""
    async def run_pod(job_obj: dict[str, Any], stop: asyncio.Event) -> int:
        pod = Pod(cluster, job_obj, volume)
        args = list(pod.container["args"])
        args[args.index("--run-dir") + 1] = str(pod.run_dir)
        args[args.index("--store") + 1] = str(pod.store_dir)
        env = {**os.environ, **pod.plain_env, TOKEN_ENV: pod.token,
               "KUBECONFIG": str(kubeconfig(cluster, volume / "kubeconfig")),
               "HOME": str(volume), "TMPDIR": str(volume)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rlhfless.cli", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        waiter = asyncio.ensure_future(proc.communicate())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                proc.terminate()
            out, _ = await waiter
        except asyncio.CancelledError:
            proc.kill()
            await proc.wait()
            raise
        finally:
            stopper.cancel()
        logs.append(out.decode(errors="replace"))
        return proc.returncode if proc.returncode is not None else 1

    return run_pod
