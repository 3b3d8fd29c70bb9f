"""The serverless platform behind one small interface.

The driver talks to this protocol only; `local.py` (processes on loopback) and `knative.py`
(a Knative Service per stage) implement it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

Payload = dict[str, Any]


class InvocationError(RuntimeError):
    """A stage function rejected a request (4xx) or no instance could serve it."""

    def __init__(self, stage: str, message: str, status: int | None = None):
        self.stage = stage
        self.status = status
        super().__init__(f"{stage}: {message}")


@dataclass(frozen=True)
class InstanceUsage:
    """One function instance's life, the unit of billing (GPUs × seconds alive)."""

    stage: str
    instance: str
    gpus: float  # GPUs billed (a fraction when instances share a GPU)
    started_at: float
    ended_at: float | None
    cold_start_s: float
    devices: tuple[str, ...] = ()  # the GPUs it held, where the runtime assigns them

    def alive_seconds(self, now: float) -> float:
        end = self.ended_at if self.ended_at is not None else now
        return max(0.0, end - self.started_at)

    def gpu_seconds(self, now: float) -> float:
        return self.gpus * self.alive_seconds(now)


@runtime_checkable
class Runtime(Protocol):
    async def scale(self, stage: str, n: int) -> None:
        """Ensure `n` warm instances of `stage` (0 releases all once idle)."""

    async def invoke(self, stage: str, payload: Payload) -> Payload:
        """Run one request on one instance of `stage`; parallel calls use parallel instances."""

    def meter(self) -> list[InstanceUsage]:
        """Every instance that has lived so far, running ones with `ended_at=None`."""

    async def close(self) -> None:
        """Stop every instance."""
