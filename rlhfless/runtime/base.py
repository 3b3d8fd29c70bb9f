"""The serverless platform behind one small interface.

The driver talks to this protocol only; `runtime/local.py` (processes on loopback) and
`knative/runtime.py` (a Knative Service per stage) implement it.

- `invoke(stage, payload)`: one request on some instance of the stage (the platform picks).
- `invoke_stream(stage, payload)`: one request whose reply is a stream of frames (the actor);
  yields `(instance, frame)`, where `instance` names the instance serving it.
- `invoke_instance(stage, instance, payload)`: a control request to that very instance, even
  while it is busy streaming (a cut, or samples handed off to it).
- `release_instance(stage, instance)`: it is done for this step; scale it down now.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Payload = dict[str, Any]


class InvocationError(RuntimeError):
    """A stage function rejected a request (4xx) or no instance could serve it. `code` is
    the function's machine-readable reason, when it gave one."""

    def __init__(self, stage: str, message: str, status: int | None = None,
                 code: str | None = None):
        self.stage = stage
        self.status = status
        self.code = code
        super().__init__(f"{stage}: {message}")


class StreamBroken(InvocationError):
    """A stream stopped before its last frame (the instance died or the connection broke);
    frames already yielded stay valid."""


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
    busy: tuple[tuple[float, float], ...] = field(default=())  # spans serving requests

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

    def invoke_stream(self, stage: str, payload: Payload) -> AsyncIterator[tuple[str, Payload]]:
        """Run one streaming request; yields (serving instance, frame) as frames arrive.
        Raises StreamBroken if the stream stops before the function ended it."""

    async def invoke_instance(self, stage: str, instance: str, payload: Payload) -> Payload:
        """A control request to one named instance (its `/control`), even while it is busy."""

    async def release_instance(self, stage: str, instance: str) -> None:
        """The instance finished its part of the step: scale it down (once idle)."""

    def meter(self) -> list[InstanceUsage]:
        """Every instance that has lived so far, running ones with `ended_at=None`."""

    async def close(self) -> None:
        """Stop every instance."""
