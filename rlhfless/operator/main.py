"""`rlhfless operator`: run the kopf operator for RLHFJob resources."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from typing import Any

import kopf

from rlhfless.operator.config import Hooks
from rlhfless.operator.handlers import operator_memo, registry


def operator_kwargs(namespace: str | None, liveness: str | None) -> dict[str, Any]:
    """kopf.run/kopf.operator arguments: one namespace or the whole cluster, no peering
    (run a single replica with the Recreate strategy)."""
    namespaces: Collection[str] = [namespace] if namespace else ()
    return {"clusterwide": namespace is None, "namespaces": namespaces,
            "liveness_endpoint": liveness, "standalone": True}


async def serve(hooks: Hooks, *, namespace: str | None = None, liveness: str | None = None,
                stop_flag: asyncio.Event | None = None,
                ready_flag: asyncio.Event | None = None) -> None:
    """The operator as a coroutine in the current event loop (embedding and tests)."""
    hooks.namespace = namespace
    await kopf.operator(registry=registry, memo=operator_memo(hooks), stop_flag=stop_flag,
                        ready_flag=ready_flag, **operator_kwargs(namespace, liveness))


def run_operator(namespace: str | None = None, liveness: str | None = None,
                 metrics_port: int = 9090, hooks: Hooks | None = None) -> None:
    """Blocking entry point: Prometheus on `metrics_port` (0 = off), then kopf until a
    signal. `liveness` is kopf's endpoint, e.g. http://0.0.0.0:8080/healthz."""
    hooks = hooks or Hooks()
    hooks.namespace = namespace
    kopf.configure(verbose=False)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if metrics_port:
        hooks.metrics.serve(metrics_port)
    kopf.run(registry=registry, memo=operator_memo(hooks), **operator_kwargs(namespace, liveness))
