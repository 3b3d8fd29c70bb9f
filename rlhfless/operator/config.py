"""Operator configuration (from the environment) and the injectable cluster hooks.

The operator never runs a driver or opens a job's files: each job's driver runs in its own
pod (`knative.driver`). What differs between a cluster and a test is only how the operator
reaches the API (login, API client), its metrics and its settings. The cluster's GPU prices
(`cost`) reach every driver pod through its environment.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlhfless.cost.prices import CostDefaults, cost_defaults_from_env
from rlhfless.knative.kube import cluster_api_client
from rlhfless.knative.pods import FunctionSettings
from rlhfless.operator.metrics import METRICS, OperatorMetrics

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient


@dataclass(frozen=True)
class OperatorConfig:
    functions: FunctionSettings = field(default_factory=FunctionSettings)
    retry_backoff_s: float = 30.0  # after a failed driver run, before starting another
    max_retries: int = 5  # consecutive failures before waiting for a spec change
    progress_interval_s: float = 5.0  # how often a job's driver Job and progress are read
    watch_interval_s: float = 0.2  # how often a daemon checks for spec changes
    cost: CostDefaults = field(default_factory=CostDefaults)  # GPU type and prices

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> OperatorConfig:
        return cls(
            functions=FunctionSettings.from_env(env),
            retry_backoff_s=float(env.get("RLHFLESS_RETRY_BACKOFF_S", "30")),
            max_retries=int(env.get("RLHFLESS_MAX_RETRIES", "5")),
            progress_interval_s=float(env.get("RLHFLESS_PROGRESS_INTERVAL_S", "5")),
            cost=cost_defaults_from_env(env),
        )


ApiClientFactory = Callable[[], Awaitable["ApiClient"]]


@dataclass
class Hooks:
    """Injection points of the operator (defaults: the in-cluster API)."""

    config: OperatorConfig = field(default_factory=OperatorConfig.from_env)
    api_client: ApiClientFactory = cluster_api_client
    login: Callable[..., Any] | None = None  # kopf login handler; None = kubernetes_asyncio
    metrics: OperatorMetrics = field(default_factory=lambda: METRICS)
    # Set by `serve`/`run_operator`: one namespace means Role-only RBAC, so kopf must not
    # scan cluster-scoped namespaces and CRDs.
    namespace: str | None = None
