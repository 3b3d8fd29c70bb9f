"""The local runtime's GPU pool: which instance holds which GPUs (pure bookkeeping).

Each instance gets a disjoint set of devices of the size its stage asks for (the stage
table's `gpus`), exported to its process as CUDA_VISIBLE_DEVICES. Nothing is ever
oversubscribed: a request that does not fit waits in line (first come, first served, so a
large request is not starved by small ones) until instances exit; the runtime may stop idle
instances of other stages to make room for the head of the line (`victims`).

Devices come from RLHFLESS_GPUS ("0,1,2,3"; empty: none), else the CUDA devices this process
sees. RLHFLESS_GPU_SLOTS=k lets k instances share each device (one-GPU machines running
actor, reference and trainer side by side): each then gets 1/k of a device's memory (vLLM's
`gpu_memory_utilization` follows) and is billed 1/k of a GPU per device.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

POOL_ENV = "RLHFLESS_GPUS"
SLOTS_ENV = "RLHFLESS_GPU_SLOTS"


class GpuPoolError(ValueError):
    """A pool setting or a request the machine can never satisfy."""


def _cuda_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count())  # counts devices without creating a context


def detect_devices(env: Mapping[str, str] | None = None,
                   count: Callable[[], int] = _cuda_count) -> tuple[str, ...]:
    """Device ids for CUDA_VISIBLE_DEVICES: RLHFLESS_GPUS, else the visible CUDA devices
    (named as this process's CUDA_VISIBLE_DEVICES names them, so children see the same)."""
    env = os.environ if env is None else env
    if POOL_ENV in env:
        value = env[POOL_ENV].strip()
        if value.lower() in ("", "none"):
            return ()
        ids = tuple(x.strip() for x in value.split(","))
        if any(not x for x in ids) or len(set(ids)) != len(ids):
            raise GpuPoolError(f"{POOL_ENV}={value!r}: expected distinct device ids, e.g. 0,1,2")
        return ids
    n = count()
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        return tuple(x.strip() for x in visible.split(",") if x.strip())[:n]
    return tuple(str(i) for i in range(n))


def detect_slots(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    value = env.get(SLOTS_ENV, "1").strip() or "1"
    if not value.isdigit() or int(value) < 1:
        raise GpuPoolError(f"{SLOTS_ENV}={value!r}: expected a whole number >= 1")
    return int(value)


def local_gpu_memory() -> tuple[float, str] | None:
    """Memory of the smallest local GPU (nvidia-smi; no CUDA context in this process)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        mib = [float(line) for line in out.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return (min(mib) * 2**20, "the smallest local GPU") if mib else None


@dataclass
class GpuPool:
    """Devices, who holds them, and who waits (pure: no processes, no clock)."""

    devices: tuple[str, ...]
    slots: int = 1
    _load: dict[str, int] = field(default_factory=dict)
    _held: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _line: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise GpuPoolError("slots must be >= 1")
        self._load = {d: 0 for d in self.devices}

    # -- questions -------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.devices)

    @property
    def share(self) -> float:
        """Share of a device's memory (and of its bill) one instance gets."""
        return 1.0 / self.slots

    def held(self) -> dict[str, tuple[str, ...]]:
        return dict(self._held)

    def waiting(self) -> list[str]:
        return [holder for holder, _ in self._line]

    def free_slots(self) -> int:
        return sum(self.slots - load for load in self._load.values())

    def impossible(self, n: int) -> bool:
        """An instance's GPUs are distinct devices: more than the pool has never fits."""
        return n > self.size

    # -- requests --------------------------------------------------------------------------
    def request(self, holder: str, n: int) -> None:
        """Join the line for `n` devices."""
        if n < 1:
            raise GpuPoolError(f"{holder}: a GPU request needs n >= 1, got {n}")
        if self.impossible(n):
            raise GpuPoolError(f"{holder}: asks for {n} GPUs, the pool has {self.size}")
        if holder in self._held or holder in self.waiting():
            raise GpuPoolError(f"{holder} already holds or waits for GPUs")
        self._line.append((holder, n))

    def cancel(self, holder: str) -> None:
        self._line = [(h, n) for h, n in self._line if h != holder]

    def grant(self, holder: str) -> tuple[str, ...] | None:
        """The devices for `holder` if it is first in line and they are free now."""
        if not self._line or self._line[0][0] != holder:
            return None
        devices = self._pick(self._line[0][1], self._load)
        if devices is None:
            return None
        self._line.pop(0)
        for d in devices:
            self._load[d] += 1
        self._held[holder] = devices
        return devices

    def release(self, holder: str) -> tuple[str, ...]:
        devices = self._held.pop(holder, ())
        for d in devices:
            self._load[d] -= 1
        return devices

    def victims(self, idle: Sequence[str], leaving: Sequence[str] = ()) -> list[str]:
        """The fewest of the `idle` holders (least recently used first) whose release lets
        the head of the line fit; [] if it fits already, will fit once the `leaving` holders
        (being stopped) are gone, or would not fit even with every idle one released."""
        if not self._line:
            return []
        need = self._line[0][1]
        load = dict(self._load)
        for holder in leaving:
            for d in self._held.get(holder, ()):
                load[d] -= 1
        if self._pick(need, load) is not None:
            return []
        chosen: list[str] = []
        for holder in idle:
            if holder not in self._held or holder in leaving:
                continue
            for d in self._held[holder]:
                load[d] -= 1
            chosen.append(holder)
            if self._pick(need, load) is not None:
                return chosen
        return []

    def _pick(self, n: int, load: Mapping[str, int]) -> tuple[str, ...] | None:
        """n devices with room, least loaded first, then in pool order (deterministic; a
        tensor-parallel group gets neighbouring ids when the pool is empty)."""
        free = [d for d in self.devices if load[d] < self.slots]
        if len(free) < n:
            return None
        order = sorted(free, key=lambda d: (load[d], self.devices.index(d)))
        return tuple(sorted(order[:n], key=self.devices.index))
