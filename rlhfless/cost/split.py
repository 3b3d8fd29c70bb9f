"""Where a step's GPU-seconds go, per stage: busy, cold start, prewarm wait, keep-alive idle.

Every GPU-second an instance is alive inside the step's window [t0, t1) lands in exactly one
bucket, so the four add up to the stage's billed GPU-seconds (`cost/gpu_seconds/<stage>`):

* cold start — from the instance's start until it is ready (model load included);
* busy — ready and serving: at each moment the stage's requests in flight (as the driver
  saw them) occupy that many ready instances, at most all of them;
* prewarm wait — ready but not yet engaged: from ready until the stage's first request in
  flight at or after that moment (the price of starting ahead of the work); an instance
  started inside the window that never serves in it waits for the next step's work;
* keep-alive idle — every other idle moment: an engaged instance with no request of its own
  (an actor done with its bin while others finish theirs, a stage kept warm after its turn).
  An instance alive before the window started served or waited before it: it counts as
  engaged from the window's start.

The serverful layout on the same measured timings holds, for the whole step, as many GPUs
per stage as its peak of requests in flight needed; its busy GPU-seconds are the requests'
own (the same work) and everything else it holds is idle. Pure functions of seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from rlhfless.scheduling.cost import Interval, Lifetime, clip

USES: tuple[str, ...] = ("busy", "cold_start", "prewarm_wait", "keep_alive_idle")


@dataclass(frozen=True)
class Split:
    busy: float = 0.0
    cold_start: float = 0.0
    prewarm_wait: float = 0.0
    keep_alive_idle: float = 0.0

    @property
    def total(self) -> float:
        return self.busy + self.cold_start + self.prewarm_wait + self.keep_alive_idle

    def as_dict(self) -> dict[str, float]:
        return {use: getattr(self, use) for use in USES}


def _in_flight(requests: Sequence[Interval], t: float) -> int:
    return sum(1 for start, end in requests if start <= t < end)


def _engaged_at(ready: float, end: float, requests: Sequence[Interval]) -> float:
    """First moment in [ready, end) with a request in flight; `end` if there is none."""
    moments = [max(ready, start) for start, stop in requests if stop > ready and start < end]
    return min(moments, default=end)


def split_stage(lives: Iterable[Lifetime], requests: Iterable[Interval], t0: float,
                t1: float) -> Split:
    """The split of one stage's GPU-seconds inside [t0, t1) (see the module docstring)."""
    reqs = [iv for r in requests if (iv := clip(r, t0, t1)) is not None]
    # Per instance: (gpus, alive from, alive to, ready from, engaged from).
    spans = []
    cold = 0.0
    for life in lives:
        window = clip((life.start, t1 if life.end is None else life.end), t0, t1)
        if window is None:
            continue
        a0, a1 = window
        ready = min(a1, max(a0, life.start + life.cold_start_s))
        cold += life.gpus * (ready - a0)
        engaged = ready if life.start < t0 else _engaged_at(ready, a1, reqs)
        spans.append((life.gpus, a0, a1, ready, engaged))
    cuts = sorted({t0, t1, *(p for s in spans for p in s[1:]), *(p for r in reqs for p in r)})
    busy = wait = idle = 0.0
    for u, v in zip(cuts, cuts[1:], strict=False):
        if v <= u:
            continue
        mid, dt = (u + v) / 2, v - u
        ready = [(g, e) for g, a0, a1, r, e in spans if r <= mid < a1]
        waiting = sum(g for g, e in ready if mid < e)
        engaged = [g for g, e in ready if mid >= e]
        serving = min(_in_flight(reqs, mid), len(engaged))
        mean_gpus = sum(engaged) / len(engaged) if engaged else 0.0
        busy += dt * serving * mean_gpus
        wait += dt * waiting
        idle += dt * (sum(engaged) - serving * mean_gpus)
    return Split(busy=busy, cold_start=cold, prewarm_wait=wait, keep_alive_idle=idle)


def peak_in_flight(requests: Iterable[Interval]) -> int:
    """Most requests in flight at once."""
    events = sorted((t, d) for start, end in requests if end > start
                    for t, d in ((start, 1), (end, -1)))
    peak = now = 0
    for _, delta in events:  # ends sort before starts at the same moment (-1 < 1)
        now += delta
        peak = max(peak, now)
    return peak


@dataclass(frozen=True)
class Serverful:
    """One stage laid out serverfully: `gpus` held for the whole step."""

    gpus: float
    gpu_seconds: float
    busy: float

    @property
    def idle(self) -> float:
        return self.gpu_seconds - self.busy


def serverful_stage(requests: Iterable[Interval], gpus_per_instance: float, t0: float,
                    t1: float) -> Serverful:
    """The stage with its peak of requests in flight held as instances for all of [t0, t1)."""
    reqs = [iv for r in requests if (iv := clip(r, t0, t1)) is not None]
    gpus = peak_in_flight(reqs) * gpus_per_instance
    held = gpus * (t1 - t0)
    busy = min(held, gpus_per_instance * sum(end - start for start, end in reqs))
    return Serverful(gpus=gpus, gpu_seconds=held, busy=busy)


def stage_gpus(lives: Mapping[str, Sequence[Lifetime]]) -> dict[str, float]:
    """GPUs per instance of each stage, as its instances were billed."""
    return {stage: max((life.gpus for life in ls), default=0.0) for stage, ls in lives.items()}
