"""Carry out a prewarm plan around a step's phases: start stages ahead, release them after.

The plan itself (`rlhfless.scheduling.prewarm_plan`) is a pure function of measured phase
times and cold starts; this is the small executor that turns it into `runtime.scale` calls
at the right moments of the driver's step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from rlhfless.api.stages import PHASE_OF, PHASES
from rlhfless.runtime.base import Runtime
from rlhfless.scheduling.prewarm import PrewarmPlan

log = logging.getLogger("rlhfless.driver")


def _log_prewarm_failure(task: asyncio.Future[None]) -> None:
    """A failed prewarm only costs a cold start later (the request starts one on demand)."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("prewarm failed: %s", task.exception())


class PhasePrewarmer:
    """`async with prewarmer.phase("score"): ...` prewarms the stages the plan starts during
    that phase and releases the phase's stages when it ends.

    `wanted(stage)` is how many instances of a stage the step needs (0: not deployed).
    """

    def __init__(self, runtime: Runtime, plan: PrewarmPlan | None,
                 wanted: Callable[[str], int], last_step: bool):
        self.runtime = runtime
        self.plan = plan
        self.wanted = wanted
        self.last_step = last_step

    def _due(self, stage: str, phase: str) -> bool:
        if self.plan is None or self.plan.start_phase.get(stage) != phase:
            return False
        # Nothing to prewarm for a step that will not run: on the last step only stages of
        # a later phase of this very step still have work.
        later_this_step = PHASES.index(PHASE_OF[stage]) > PHASES.index(phase)
        return self.wanted(stage) > 0 and (later_this_step or not self.last_step)

    @contextlib.asynccontextmanager
    async def phase(self, phase: str) -> AsyncIterator[None]:
        pending: dict[str, asyncio.Task[None]] = {}
        if self.plan is not None:
            for stage in self.plan.start_phase:
                if self._due(stage, phase):
                    pending[stage] = asyncio.create_task(
                        self._start_later(stage, self.plan.start_offsets[stage]))
        try:
            yield
        finally:
            if self.plan is not None:
                for stage in self.plan.scale_to_zero_after.get(phase, []):
                    if stage not in pending:  # being prewarmed for its next turn: keep it
                        await self.runtime.scale(stage, 0)
            for stage, task in pending.items():
                if task.done() or not task.cancel():
                    continue
                # Still waiting for its moment: the phase it prewarms for is next, start now.
                pending[stage] = asyncio.create_task(self._start_later(stage, 0.0))
            await asyncio.gather(*pending.values(), return_exceptions=True)

    async def _start_later(self, stage: str, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        # Once started, a cold start runs to the end even if its phase closes meanwhile.
        start = asyncio.ensure_future(self.runtime.scale(stage, self.wanted(stage)))
        start.add_done_callback(_log_prewarm_failure)
        await asyncio.shield(start)
