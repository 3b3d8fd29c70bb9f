"""Run a rollout engine in this process and collect its frames (what an actor function
streams): engine tests and the GPU checks call it; `collect(engine, request,
cut_at_tau=True)` also plays the driver's part of cutting the actor once it reports τ."""

from __future__ import annotations

from pydantic import BaseModel

from rlhfless.api.wire import (
    ActorRequest,
    CutFrame,
    EndFrame,
    ProgressFrame,
    RolloutSample,
    SamplesFrame,
)
from rlhfless.functions.engines.base import RolloutControl, RolloutEngine, RolloutLedger


class Collected:
    """A whole rollout run in-process (tests, in-process runtimes): its frames, every sample
    it reported (finished, or handed back by a cut) in request order, and its stats."""

    def __init__(self, request: ActorRequest, frames: list[BaseModel]):
        self.frames = frames
        reported: dict[tuple[str, int], RolloutSample] = {}
        self.stats: dict[str, float] = {}
        for frame in frames:
            if isinstance(frame, SamplesFrame):
                reported.update({(s.key, s.index): s for s in frame.samples})
            elif isinstance(frame, CutFrame):
                reported.update({(s.key, s.index): s for s in frame.finished + frame.unfinished})
                self.stats = frame.stats
            elif isinstance(frame, EndFrame):
                self.stats = frame.stats
        order = [(p.key, i) for p in request.prompts for i in p.sample_indices]
        self.samples = [reported[k] for k in order if k in reported]
        self.samples += [s for k, s in reported.items() if k not in set(order)]

    @property
    def cut(self) -> bool:
        return any(isinstance(f, CutFrame) for f in self.frames)


def collect(engine: RolloutEngine, request: ActorRequest, cut_at_tau: bool = False,
            control: RolloutControl | None = None) -> Collected:
    """Run `request` on `engine` here; with `cut_at_tau`, cut it once τ is reported (what the
    driver does when another actor is still running)."""
    control = control or RolloutControl(request)
    frames: list[BaseModel] = []

    def emit(frame: BaseModel) -> None:
        frames.append(frame)
        if cut_at_tau and isinstance(frame, ProgressFrame):
            control.request_cut()

    try:
        engine.rollout(request, RolloutLedger(request, emit), control)
    finally:
        control.close()
    return Collected(request, frames)
