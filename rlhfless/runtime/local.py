"""The embedded default runtime: each function instance is a local process on loopback.

It behaves like a small serverless platform: instances cold-start on demand (the measured
start-to-ready time is the cold start), one request at a time per instance, idle instances
are stopped after the keep-alive (scale to zero), a request whose instance dies is retried on
another one, and every instance's life is metered as GPUs × seconds alive (with the spans it
spent serving). An instance is addressed by its handle (`actor-3`): `invoke_instance` posts
to that process's `/control` even while a stream keeps it busy. The run directory's
`prometheus_targets.json` lists the ready instances' /metrics for Prometheus.

Instances listen on loopback only and require a per-run bearer token (`token`), as Knative
functions require the job's: another local user cannot call them. `invoke`, `invoke_stream`
and `invoke_instance` all send it.

On a machine with GPUs each instance gets its own devices from a pool (`gpu_pool.py`,
CUDA_VISIBLE_DEVICES); a start that does not fit waits for GPUs, never oversubscribing them.
Without GPUs (or RLHFLESS_GPUS empty) every instance runs on the CPU and is billed the GPUs
its stage asks for, as the cluster would bill it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from rlhfless.api import codec
from rlhfless.api.spec import RLHFJob, dump_job, job_namespace
from rlhfless.api.wire import GPU_SHARE_ENV, INSTANCE_ENV, TOKEN_ENV, bearer
from rlhfless.runtime.base import InstanceUsage, InvocationError, Payload, StreamBroken
from rlhfless.runtime.discovery import TARGETS_FILE, Target, TargetsFile
from rlhfless.runtime.gpu_pool import GpuPool, GpuPoolError, detect_devices, detect_slots
from rlhfless.runtime.transport import decode_body, encode_body, error_of, frames, post_control

READY_TIMEOUT_S = 300.0
MAX_ATTEMPTS = 3
log = logging.getLogger(__name__)


@dataclass
class _Instance:
    stage: str
    name: str
    port: int
    process: subprocess.Popen[bytes]
    gpus: float  # billed
    started_at: float
    ready_at: float | None = None
    ended_at: float | None = None  # when the process was seen to exit: billing stops here
    stopping: bool = False
    busy: bool = False
    last_used: float = field(default_factory=time.time)
    log_path: Path | None = None
    devices: tuple[str, ...] = ()  # GPUs from the pool (CUDA_VISIBLE_DEVICES)
    busy_spans: list[tuple[float, float]] = field(default_factory=list)
    released: bool = False  # done for this step: stop once its request ends
    # Started by `scale` for work that is coming (prewarm, the step's actors): not a spare
    # to stop for another stage's GPUs before its first request.
    reserved: bool = False
    _busy_since: float | None = None

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
            devices=self.devices,
            busy=tuple(self.busy_spans) + (((self._busy_since, time.time()),)
                                            if self.busy and self._busy_since else ()),
        )

    def mark_busy(self) -> None:
        self.busy = True
        self._busy_since = time.time()

    def mark_idle(self) -> None:
        if self._busy_since is not None:
            self.busy_spans.append((self._busy_since, time.time()))
        self.busy, self._busy_since = False, None


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
        self._targets = TargetsFile(self.run_dir / TARGETS_FILE, job_namespace(job),
                                    job.metadata.name)
        self._pool: GpuPool | None = None
        self._waiting_gpus: dict[str, str] = {}  # instance name -> stage, in the GPU line
        self._wakes: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------------------
    async def __aenter__(self) -> LocalRuntime:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._logs.mkdir(exist_ok=True)
        self._pool = self._make_pool()
        self._job_file.write_text(json.dumps(dump_job(self.job)))
        self._publish_targets()  # the file exists from the start: Prometheus can watch it
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
        pending = self._gpu_waits(stage)
        if n > len(alive) + pending:
            more = min(n, self._max[stage]) - len(alive) - pending
            starts = [self._start(stage) for _ in range(more)]
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
        body, headers = encode_body(payload)
        last_error = "no attempt made"
        for _ in range(MAX_ATTEMPTS):
            inst = await self._acquire(stage)
            try:
                response = await self._client.post(f"{inst.url}/invoke", content=body,
                                                   headers=headers)
            except httpx.TransportError as exc:
                # The instance died under the request: retire it and try another one. Stage
                # functions are idempotent per request id, so a retry never double-applies.
                last_error = f"instance {inst.name} failed: {type(exc).__name__}"
                self._stop(inst)
                await self._release(inst)
                continue
            await self._release(inst)
            if response.status_code >= 400:
                message, code = error_of(response)
                raise InvocationError(stage, message, response.status_code, code)
            return decode_body(response)
        raise InvocationError(stage, f"gave up after {MAX_ATTEMPTS} attempts: {last_error}")

    async def invoke_stream(self, stage: str,
                            payload: Payload) -> AsyncIterator[tuple[str, Payload]]:
        if stage not in self._max:
            raise InvocationError(stage, self._not_deployed(stage))
        body, headers = encode_body(payload)
        last_error = "no attempt made"
        for _ in range(MAX_ATTEMPTS):
            inst = await self._acquire(stage)
            started = False
            try:
                async with self._client.stream("POST", f"{inst.url}/invoke", content=body,
                                               headers=headers) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        message, code = error_of(response)
                        raise InvocationError(stage, message, response.status_code, code)
                    async for frame in frames(response):
                        started = True
                        yield inst.name, frame
                return
            except (httpx.TransportError, codec.CodecError) as exc:
                last_error = f"instance {inst.name} failed: {type(exc).__name__}"
                self._stop(inst)
                if started:  # frames went out: the caller decides what to redo
                    raise StreamBroken(stage, f"stream from {inst.name} broke: "
                                              f"{type(exc).__name__}") from None
            finally:
                await self._release(inst)
        raise InvocationError(stage, f"gave up after {MAX_ATTEMPTS} attempts: {last_error}")

    async def invoke_instance(self, stage: str, instance: str, payload: Payload) -> Payload:
        inst = next((i for i in self._instances if i.name == instance and i.stage == stage),
                    None)
        if inst is None or not inst.alive:
            raise InvocationError(stage, f"no live instance {instance!r}", 404)
        return await post_control(self._client, stage, inst.url,
                                  f"instance {instance} failed", payload)

    async def release_instance(self, stage: str, instance: str) -> None:
        for inst in self._instances:
            if inst.name == instance and inst.stage == stage and inst.alive:
                if inst.busy:
                    inst.released = True  # stops as soon as its request ends
                else:
                    self._stop(inst)

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
                idle = [i for i in idle if not i.released]
                if idle:
                    inst = max(idle, key=lambda i: i.last_used)  # warmest first
                    inst.reserved = False
                    inst.mark_busy()
                    return inst
                # A prewarmed instance still starting will be ready sooner than a new one.
                starting = [i for i in alive if not i.busy and i.ready_at is None]
                pending = self._gpu_waits(stage)
                if not starting and not pending and len(alive) < self._max[stage]:
                    break
                await self._changed.wait()
        inst = await self._start(stage, busy=True)
        inst.mark_busy()
        return inst

    async def _release(self, inst: _Instance) -> None:
        inst.mark_idle()
        inst.last_used = time.time()
        if inst.released:
            self._stop(inst)
        async with self._changed:
            self._changed.notify_all()

    def _threads(self, stage: str) -> int:
        if self.threads_per_instance:
            return self.threads_per_instance
        # In a streaming step every actor and the learner compute at once: share the cores
        # among all of them (oversubscribed OpenMP threads spin against each other).
        cores = os.cpu_count() or 1
        concurrent = sum(n for s, n in self._max.items() if s in ("actor", "learner"))
        return max(1, cores // max(1, concurrent))

    async def _start(self, stage: str, busy: bool = False) -> _Instance:
        name = f"{stage}-{next(self._counter)}"
        port = _free_port()
        log_path = self._logs / f"{name}.log"
        devices = await self._take_gpus(stage, name)
        gpus: float = self._stages[stage].gpus
        cmd = [
            sys.executable, "-m", "rlhfless.functions.serve",
            "--stage", stage, "--port", str(port), "--host", "127.0.0.1",
            "--store", str(self.store_dir), "--job", str(self._job_file),
            "--threads", str(self._threads(stage)), "--exit-with-parent",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               INSTANCE_ENV: name, TOKEN_ENV: self.token}
        if self._pool is not None:
            # Its own GPUs only (none for a CPU stage), billed as given.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
            gpus = len(devices) * self._pool.share
            if devices and self._pool.slots > 1:
                env[GPU_SHARE_ENV] = f"{self._pool.share:.4f}"
        try:
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
        except BaseException:
            self._give_back_gpus(name)
            raise
        inst = _Instance(stage, name, port, process, gpus, time.time(), busy=busy,
                         log_path=log_path, devices=devices, reserved=not busy)
        self._instances.append(inst)
        try:
            await self._wait_ready(inst)
        except BaseException:  # cancelled too: never leave a half-started instance behind
            self._stop(inst)
            raise
        else:
            self._publish_targets()
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
        self._publish_targets()
        if inst.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(inst.process.pid, signal.SIGTERM)
            loop = asyncio.get_running_loop()
            loop.call_later(5.0, self._kill, inst)
            self._exits.append(asyncio.create_task(self._await_exit(inst)))
        else:
            inst.ended_at = time.time()
            self._give_back_gpus(inst.name)

    def _publish_targets(self) -> None:
        live = [Target(f"127.0.0.1:{i.port}", i.stage, i.name)
                for i in self._instances if i.alive and i.ready_at is not None]
        try:
            self._targets.publish(live)
        except OSError as exc:  # monitoring must never fail a training run
            log.warning("cannot write %s: %s", self._targets.path, exc)

    async def _await_exit(self, inst: _Instance) -> None:
        await asyncio.to_thread(inst.process.wait)
        inst.ended_at = time.time()
        self._give_back_gpus(inst.name)  # only now is the GPU memory really free

    @staticmethod
    def _kill(inst: _Instance) -> None:
        if inst.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(inst.process.pid, signal.SIGKILL)
            inst.process.wait()

    # -- the GPU pool ----------------------------------------------------------------------
    def _make_pool(self) -> GpuPool | None:
        """The machine's GPUs, or None on a machine without any; a stage asking for more
        GPUs than exist can never start, so that is an error now, not a wait forever."""
        try:
            devices, slots = detect_devices(), detect_slots()
        except GpuPoolError as exc:
            raise InvocationError("runtime", str(exc)) from None
        if not devices:
            return None
        pool = GpuPool(devices, slots)
        for stage in self._stages:
            if stage.deployed and pool.impossible(stage.gpus):
                raise InvocationError(stage.name, (
                    f"asks for {stage.gpus} GPUs per instance (resources.{stage.name}.gpus) "
                    f"but this machine has {pool.size} ({', '.join(devices)}; set by "
                    "RLHFLESS_GPUS or the visible CUDA devices)"))
        return pool

    def _gpu_waits(self, stage: str) -> int:
        return sum(1 for s in self._waiting_gpus.values() if s == stage)

    async def _take_gpus(self, stage: str, name: str) -> tuple[str, ...]:
        """Wait in line for the stage's GPUs (stopping idle instances of other stages when
        that makes room for the head of the line)."""
        n = self._stages[stage].gpus
        if self._pool is None or n == 0:
            return ()
        async with self._changed:
            self._pool.request(name, n)
            self._waiting_gpus[name] = stage
            try:
                while (devices := self._pool.grant(name)) is None:
                    self._make_room()
                    await self._changed.wait()
            except BaseException:
                self._pool.cancel(name)
                raise
            finally:
                del self._waiting_gpus[name]
                self._changed.notify_all()  # the next in line may fit now (or be first)
        return devices

    def _make_room(self) -> None:
        assert self._pool is not None
        line = self._pool.waiting()
        if not line:
            return
        head_stage = self._waiting_gpus.get(line[0])
        held = self._pool.held()
        leaving = [i.name for i in self._instances if i.stopping and i.name in held]
        idle = sorted((i for i in self._instances
                       if i.alive and not i.busy and i.ready_at is not None and not i.reserved
                       and i.stage != head_stage and i.name in held),
                      key=lambda i: i.last_used)
        names = {i.name: i for i in idle}
        for victim in self._pool.victims([i.name for i in idle], leaving=leaving):
            self._stop(names[victim])

    def _give_back_gpus(self, name: str) -> None:
        if self._pool is None or not self._pool.release(name):
            return

        async def wake() -> None:
            async with self._changed:
                self._changed.notify_all()

        with contextlib.suppress(RuntimeError):  # no running loop: nobody is waiting
            task = asyncio.get_running_loop().create_task(wake())
            self._wakes.add(task)
            task.add_done_callback(self._wakes.discard)

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
