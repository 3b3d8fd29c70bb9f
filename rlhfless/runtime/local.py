"""The embedded default runtime: each function instance is a local process on loopback.

It behaves like a small serverless platform: instances cold-start on demand (the measured
start-to-ready time is the cold start), one request at a time per instance, idle instances
are stopped after the keep-alive (scale to zero), a request whose instance dies is retried on
another one, and every instance's life is metered as GPUs × seconds alive. Instances listen
on loopback only and require a per-run bearer token (`token`), as Knative functions require
the job's: another local user cannot call them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from rlhfless.api.spec import RLHFJob, dump_job
from rlhfless.api.wire import TOKEN_ENV, bearer
from rlhfless.runtime.base import InstanceUsage, InvocationError, Payload

READY_TIMEOUT_S = 300.0
MAX_ATTEMPTS = 3


@dataclass
class _Instance:
    stage: str
    name: str
    port: int
    process: subprocess.Popen[bytes]
    gpus: int
    started_at: float
    ready_at: float | None = None
    ended_at: float | None = None  # when the process was seen to exit: billing stops here
    stopping: bool = False
    busy: bool = False
    last_used: float = field(default_factory=time.time)
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        """Able to take requests (a stopping instance is still billed, but not alive)."""
        return not self.stopping and self.process.poll() is None

    def usage(self) -> InstanceUsage:
        ready = self.ready_at if self.ready_at is not None else self.started_at
        return InstanceUsage(
            stage=self.stage,
            instance=self.name,
            gpus=self.gpus,
            started_at=self.started_at,
            ended_at=self.ended_at,
            cold_start_s=ready - self.started_at,
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalRuntime:
    """Runtime protocol on local processes. Use as an async context manager."""

    def __init__(
        self,
        job: RLHFJob,
        store_dir: Path,
        run_dir: Path,
        *,
        keep_alive_s: float | None = None,
        threads_per_instance: int | None = None,
        token: str | None = None,
    ):
        self.job = job
        self.token = token or secrets.token_urlsafe(32)
        self.store_dir = Path(store_dir)
        self.run_dir = Path(run_dir)
        self.keep_alive_s = (
            job.spec.scheduling.keep_alive_s if keep_alive_s is None else keep_alive_s
        )
        self.threads_per_instance = threads_per_instance
        self._instances: list[_Instance] = []
        self._counter = itertools.count()
        self._changed = asyncio.Condition()
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                         headers=bearer(self.token))
        self._reaper: asyncio.Task[None] | None = None
        self._exits: list[asyncio.Task[None]] = []
        self._job_file = self.run_dir / "job.json"
        self._logs = self.run_dir / "logs"
        self._stages = job.spec.stages
        self._max = {s.name: s.max_scale for s in self._stages if s.deployed}

    # -- lifecycle -----------------------------------------------------------------------
    async def __aenter__(self) -> LocalRuntime:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._logs.mkdir(exist_ok=True)
        self._job_file.write_text(json.dumps(dump_job(self.job)))
        self._reaper = asyncio.create_task(self._reap_idle())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for inst in self._instances:
            self._stop(inst)
        # Wait for every process to exit (graceful first), so nothing outlives the runtime.
        await asyncio.gather(*self._exits, return_exceptions=True)
        await self._client.aclose()

    # -- the Runtime protocol ------------------------------------------------------------
    async def scale(self, stage: str, n: int) -> None:
        """Start instances until `n` are alive; with fewer wanted, stop idle extras now."""
        if stage not in self._max:
            if n == 0:
                return  # a stage this job never deploys: nothing to release
            raise InvocationError(stage, self._not_deployed(stage))
        alive = [i for i in self._instances if i.stage == stage and i.alive]
        if n > len(alive):
            starts = [self._start(stage) for _ in range(min(n, self._max[stage]) - len(alive))]
            await asyncio.gather(*starts)
        else:
            extra = len(alive) - n
            for inst in sorted(alive, key=lambda i: i.last_used):
                if extra <= 0:
                    break
                # Busy or still starting instances are someone's: only idle ready ones go.
                if not inst.busy and inst.ready_at is not None:
                    self._stop(inst)
                    extra -= 1
        async with self._changed:
            self._changed.notify_all()

    async def invoke(self, stage: str, payload: Payload) -> Payload:
        if stage not in self._max:
            raise InvocationError(stage, self._not_deployed(stage))
        last_error = "no attempt made"
        for _ in range(MAX_ATTEMPTS):
            inst = await self._acquire(stage)
            try:
                response = await self._client.post(f"{inst.url}/invoke", json=payload)
            except httpx.TransportError as exc:
                # The instance died under the request: retire it and try another one. Stage
                # functions are idempotent per request id, so a retry never double-applies.
                last_error = f"instance {inst.name} failed: {type(exc).__name__}"
                self._stop(inst)
                await self._release(inst)
                continue
            await self._release(inst)
            if response.status_code >= 400:
                try:
                    message = response.json().get("error", response.text)
                except ValueError:
                    message = response.text
                raise InvocationError(stage, message, response.status_code)
            return response.json()
        raise InvocationError(stage, f"gave up after {MAX_ATTEMPTS} attempts: {last_error}")

    def meter(self) -> list[InstanceUsage]:
        for inst in self._instances:
            if inst.ended_at is None and not inst.stopping and inst.process.poll() is not None:
                inst.ended_at = time.time()  # died on its own (e.g. killed): seen now
        return [inst.usage() for inst in self._instances]

    # -- local extras (used by the driver's records and by tests) ------------------------
    def instances(self, stage: str | None = None) -> list[_Instance]:
        return [i for i in self._instances if stage is None or i.stage == stage]

    # -- internals -----------------------------------------------------------------------
    def _not_deployed(self, stage: str) -> str:
        return f"not a stage of this job (its stages: {', '.join(self._max)})"

    async def _acquire(self, stage: str) -> _Instance:
        async with self._changed:
            while True:
                alive = [i for i in self._instances if i.stage == stage and i.alive]
                idle = [i for i in alive if not i.busy and i.ready_at is not None]
                if idle:
                    inst = max(idle, key=lambda i: i.last_used)  # warmest first
                    inst.busy = True
                    return inst
                # A prewarmed instance still starting will be ready sooner than a new one.
                starting = [i for i in alive if not i.busy and i.ready_at is None]
                if not starting and len(alive) < self._max[stage]:
                    break
                await self._changed.wait()
        inst = await self._start(stage, busy=True)
        return inst

    async def _release(self, inst: _Instance) -> None:
        now = time.time()
        inst.busy = False
        inst.last_used = now
        async with self._changed:
            self._changed.notify_all()

    def _threads(self, stage: str) -> int:
        if self.threads_per_instance:
            return self.threads_per_instance
        cores = os.cpu_count() or 1
        return max(1, cores // max(1, self._max[stage]))

    async def _start(self, stage: str, busy: bool = False) -> _Instance:
        name = f"{stage}-{next(self._counter)}"
        port = _free_port()
        log_path = self._logs / f"{name}.log"
        gpus = self._stages[stage].gpus
        cmd = [
            sys.executable, "-m", "rlhfless.functions.serve",
            "--stage", stage, "--port", str(port), "--host", "127.0.0.1",
            "--store", str(self.store_dir), "--job", str(self._job_file),
            "--threads", str(self._threads(stage)), "--exit-with-parent",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               TOKEN_ENV: self.token}
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        inst = _Instance(stage, name, port, process, gpus, time.time(), busy=busy,
                         log_path=log_path)
        self._instances.append(inst)
        try:
            await self._wait_ready(inst)
        except BaseException:  # cancelled too: never leave a half-started instance behind
            self._stop(inst)
            raise
        finally:
            async with self._changed:
                self._changed.notify_all()
        return inst

    async def _wait_ready(self, inst: _Instance) -> None:
        deadline = time.time() + READY_TIMEOUT_S
        while time.time() < deadline:
            if inst.process.poll() is not None:
                tail = inst.log_path.read_text()[-2000:] if inst.log_path else ""
                raise InvocationError(inst.stage, f"instance {inst.name} exited during start:\n"
                                      f"{tail}")
            try:
                response = await self._client.get(f"{inst.url}/healthz", timeout=2.0)
                if response.status_code == 200:
                    inst.ready_at = inst.last_used = time.time()
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
        raise InvocationError(inst.stage, f"instance {inst.name} not ready in {READY_TIMEOUT_S}s")

    def _stop(self, inst: _Instance) -> None:
        """Ask the process to exit (SIGKILL if it lingers); billing runs until it has exited."""
        if inst.stopping:
            return
        inst.stopping = True
        if inst.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(inst.process.pid, signal.SIGTERM)
            loop = asyncio.get_running_loop()
            loop.call_later(5.0, self._kill, inst)
            self._exits.append(asyncio.create_task(self._await_exit(inst)))
        else:
            inst.ended_at = time.time()

    @staticmethod
    async def _await_exit(inst: _Instance) -> None:
        await asyncio.to_thread(inst.process.wait)
        inst.ended_at = time.time()

    @staticmethod
    def _kill(inst: _Instance) -> None:
        if inst.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(inst.process.pid, signal.SIGKILL)
            inst.process.wait()

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, max(0.1, self.keep_alive_s / 4)))
            now = time.time()
            for inst in self._instances:
                if not inst.alive:
                    if not inst.stopping:
                        self._stop(inst)  # died on its own: account for it
                    continue
                if not inst.busy and inst.ready_at and now - inst.last_used > self.keep_alive_s:
                    self._stop(inst)
