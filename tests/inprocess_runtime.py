"""The Runtime protocol over stage handlers in this process (threads, no HTTP): lets tests
drive the real rollout and learner logic quickly and deterministically."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import TypeAdapter

from rlhfless.api.wire import CONTROLS, REQUESTS
from rlhfless.functions.app import FunctionError
from rlhfless.functions.serve import build_handler
from rlhfless.runtime.base import InstanceUsage, InvocationError


class InProcessRuntime:
    """One handler per instance; an actor instance serves one stream at a time."""

    def __init__(self, job, store, duplicate_frames: bool = False, hold_at_tau: bool = False):
        self.job, self.store = job, store
        self.instances: dict[str, Any] = {}
        self.busy: set[str] = set()
        self.scaled: list[tuple[str, int]] = []
        self.released: list[str] = []
        self.controls: list[tuple[str, dict]] = []
        self.calls: list[tuple[str, dict]] = []
        self.duplicate_frames = duplicate_frames
        # Hold an actor that reported τ until the driver's cut reaches it: on a tiny model
        # the rest of its samples would otherwise finish before any decision could arrive.
        self.hold_at_tau = hold_at_tau
        self._names = itertools.count()

    def _instance(self, stage: str) -> str:
        for name in self.instances:
            if name.startswith(stage) and name not in self.busy and name not in self.released:
                return name
        return self._start(stage)

    def prestart(self, stage: str, n: int) -> None:
        """Start `n` instances now (warm), as a prewarmed platform would have them."""
        for _ in range(n):
            self._start(stage)

    def _start(self, stage: str) -> str:
        name = f"{stage}-{next(self._names)}"
        handler = build_handler(stage, self.job, self.store)
        # Load here, one at a time: model loading is not thread-safe within one process
        # (every real instance is a process of its own).
        warm = getattr(handler, "warm", None)
        if warm is not None:
            warm(self.store.latest())
        self.instances[name] = handler
        return name

    async def scale(self, stage: str, n: int) -> None:
        self.scaled.append((stage, n))

    async def invoke(self, stage: str, payload: dict) -> dict:
        self.calls.append((stage, payload))
        name = self._instance(stage)
        request = TypeAdapter(REQUESTS[stage]).validate_python(payload)
        try:
            reply = await asyncio.to_thread(self.instances[name].handle, request)
        except FunctionError as exc:
            raise InvocationError(stage, exc.message, exc.status, exc.code) from None
        return reply.model_dump()

    async def invoke_stream(self, stage: str, payload: dict) -> AsyncIterator[tuple[str, dict]]:
        name = self._instance(stage)
        self.busy.add(name)
        handler = self.instances[name]
        request = TypeAdapter(REQUESTS[stage]).validate_python(payload)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def emit(frame) -> None:
            for _ in range(2 if self.duplicate_frames and frame.type == "samples" else 1):
                loop.call_soon_threadsafe(queue.put_nowait, frame.model_dump())
            if self.hold_at_tau and frame.type == "progress":
                self.hold_at_tau = False  # the first actor to report τ only
                control = handler._running
                deadline = time.monotonic() + 30.0
                while not control.cut_requested and time.monotonic() < deadline:
                    time.sleep(0.001)

        def work() -> None:
            try:
                handler.stream(request, emit)
            except BaseException as exc:  # noqa: BLE001 - handed to the reader
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            loop.call_soon_threadsafe(queue.put_nowait, None)

        worker = asyncio.ensure_future(asyncio.to_thread(work))
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield name, item
        finally:
            await worker
            self.busy.discard(name)

    async def invoke_instance(self, stage: str, instance: str, payload: dict) -> dict:
        self.controls.append((instance, payload))
        request = TypeAdapter(CONTROLS[stage]).validate_python(payload)
        reply = await asyncio.to_thread(self.instances[instance].control, request)
        return reply.model_dump()

    async def release_instance(self, stage: str, instance: str) -> None:
        self.released.append(instance)

    def meter(self) -> list[InstanceUsage]:
        return []

    async def close(self) -> None:
        pass
