"""Operator configuration (from the environment) and the injectable runtime/driver hooks.

The handlers only ever build runtimes and drivers through `Hooks`, so tests (and embedded
uses) run the real kopf handlers with the local runtime, or a fake one, instead of Knative.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import TypeAdapter, ValidationError

from rlhfless.api.spec import GPU_TYPE_PATTERN, GpuPrice, GpuType, RLHFJob
from rlhfless.cost.prices import DEFAULT_GPU_TYPE, DEFAULT_PRICES, ON_DEMAND, SPOT, CostDefaults
from rlhfless.cost.prices import with_defaults as cost_with_defaults
from rlhfless.knative.services import FunctionSettings, job_dir
from rlhfless.operator.metrics import METRICS, OperatorMetrics
from rlhfless.runtime.base import Runtime

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient

    from rlhfless.driver.records import StepRecord
    from rlhfless.knative.kube import Kube


_PRICE_TABLE = TypeAdapter(dict[GpuType, GpuPrice])


def cost_defaults_from_env(env: Mapping[str, str]) -> CostDefaults:
    """The cluster's GPU type, pricing and price table (Helm values `cost.*`); a bad value is
    an error naming the variable, so the operator refuses to start rather than misprice."""
    import re

    gpu_type = env.get("RLHFLESS_GPU_TYPE") or DEFAULT_GPU_TYPE
    if not re.match(GPU_TYPE_PATTERN, gpu_type):
        raise ValueError(f"RLHFLESS_GPU_TYPE: {gpu_type!r} is not a GPU type name")
    pricing = env.get("RLHFLESS_PRICING") or ON_DEMAND
    if pricing not in (ON_DEMAND, SPOT):
        raise ValueError(f"RLHFLESS_PRICING: must be {ON_DEMAND!r} or {SPOT!r}, got {pricing!r}")
    prices = dict(DEFAULT_PRICES)
    raw = env.get("RLHFLESS_GPU_PRICES")
    if raw:
        try:
            prices = _PRICE_TABLE.validate_python(json.loads(raw), strict=True)
        except ValidationError as exc:
            where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                              for e in exc.errors())
            raise ValueError(f"RLHFLESS_GPU_PRICES (Helm values cost.prices): {where}") from None
        except ValueError as exc:
            raise ValueError(f"RLHFLESS_GPU_PRICES: not JSON: {exc}") from None
    return CostDefaults(gpu_type=gpu_type, pricing=pricing, prices=prices)


def _bool(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class OperatorConfig:
    data_dir: Path = Path("/data")  # the operator's mount of the shared weights volume
    functions: FunctionSettings = field(default_factory=FunctionSettings)
    retry_backoff_s: float = 30.0  # after a failed step, before resuming from the checkpoint
    max_retries: int = 5  # consecutive failures before waiting for a spec change
    meter_interval_s: float = 5.0
    watch_interval_s: float = 0.2  # how often a running job checks for suspend/spec changes
    cost: CostDefaults = field(default_factory=CostDefaults)  # GPU type and prices

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> OperatorConfig:
        functions = FunctionSettings(
            weights_pvc=env.get("RLHFLESS_WEIGHTS_PVC", "rlhfless-weights"),
            data_mount=env.get("RLHFLESS_FUNCTION_DATA_MOUNT", "/data"),
            timeout_s=int(env.get("RLHFLESS_FUNCTION_TIMEOUT_S", "600")),
            progress_deadline_s=int(env.get("RLHFLESS_PROGRESS_DEADLINE_S", "1200")),
            allow_zero_initial_scale=_bool(env.get("RLHFLESS_ALLOW_ZERO_INITIAL_SCALE"), False),
            image_pull_policy=env.get("RLHFLESS_IMAGE_PULL_POLICY") or None,
            service_account=env.get("RLHFLESS_FUNCTION_SERVICE_ACCOUNT") or None,
        )
        return cls(
            data_dir=Path(env.get("RLHFLESS_DATA_DIR", "/data")),
            functions=functions,
            retry_backoff_s=float(env.get("RLHFLESS_RETRY_BACKOFF_S", "30")),
            max_retries=int(env.get("RLHFLESS_MAX_RETRIES", "5")),
            meter_interval_s=float(env.get("RLHFLESS_METER_INTERVAL_S", "5")),
            cost=cost_defaults_from_env(env),
        )

    def job_paths(self, namespace: str, name: str, uid: str) -> tuple[Path, Path]:
        """(run_dir, store_dir) of a job on the operator's mount of the weights volume."""
        home = self.data_dir / job_dir(namespace, name, uid)
        return home / "run", home / "store"


@dataclass
class JobContext:
    """Everything a runtime or driver factory may need about one job."""

    job: RLHFJob
    namespace: str
    name: str
    uid: str
    run_dir: Path
    store_dir: Path
    kube: Kube
    config: OperatorConfig


class DriverLike(Protocol):
    async def run(self, stop: Any = None,
                  on_step: Callable[[StepRecord], Awaitable[None] | None] | None = None) -> int:
        """Run until spec.steps or `stop` (after the current step); return steps done."""


RuntimeFactory = Callable[[JobContext], AbstractAsyncContextManager[Runtime]]
DriverFactory = Callable[[JobContext, Runtime], DriverLike]
ApiClientFactory = Callable[[], Awaitable["ApiClient"]]


def knative_runtime(ctx: JobContext) -> AbstractAsyncContextManager[Runtime]:
    from rlhfless.knative.runtime import KnativeRuntime

    return KnativeRuntime(ctx.job, namespace=ctx.namespace, kube=ctx.kube,
                          settings=ctx.config.functions,
                          meter_interval_s=ctx.config.meter_interval_s)


def priced_job(job: RLHFJob, defaults: CostDefaults) -> RLHFJob:
    """The job with the cluster's GPU type and prices filled into `spec.cost`."""
    spec = job.spec.model_copy(update={"cost": cost_with_defaults(job.spec.cost, defaults)})
    return job.model_copy(update={"spec": spec})


def real_driver(ctx: JobContext, runtime: Runtime) -> DriverLike:
    from rlhfless.driver import Driver

    return Driver(priced_job(ctx.job, ctx.config.cost), runtime, ctx.run_dir,
                  store_dir=ctx.store_dir)


async def cluster_api_client() -> ApiClient:
    """In-cluster service account, else the developer's kubeconfig."""
    from kubernetes_asyncio import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        await config.load_kube_config()
    return client.ApiClient()


@dataclass
class Hooks:
    """Injection points of the operator (defaults: Knative runtime, real driver)."""

    config: OperatorConfig = field(default_factory=OperatorConfig.from_env)
    runtime_factory: RuntimeFactory = knative_runtime
    driver_factory: DriverFactory = real_driver
    api_client: ApiClientFactory = cluster_api_client
    login: Callable[..., Any] | None = None  # kopf login handler; None = kubernetes_asyncio
    metrics: OperatorMetrics = field(default_factory=lambda: METRICS)
