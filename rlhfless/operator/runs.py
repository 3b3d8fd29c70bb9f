"""What a job's daemon remembers between looks at its driver: failed runs in a row, and the
steps it has reported. Pure bookkeeping, tested without a cluster."""

from __future__ import annotations

from dataclasses import dataclass

from rlhfless.api.progress import Progress, StepSummary
from rlhfless.operator.decide import DriverState


@dataclass
class Failures:
    """Failed driver runs in a row, under one spec version. A run that checkpointed a step
    starts the count over; a spec change clears it."""

    count: int = 0
    version: int = -1  # the spec version they were counted under
    retry_due: bool = False  # the back-off after the last failure is over
    error: str = ""
    judged: str | None = None  # the finished driver Job (uid) already judged
    run_from: int = -1  # checkpointed step when the current run started

    def on_spec(self, version: int) -> None:
        if version != self.version:
            self.count, self.retry_due = 0, False

    def started(self, checkpoint_step: int) -> None:
        self.run_from = checkpoint_step

    def judge(self, driver: DriverState, uid: str | None, failed: bool, message: str,
              checkpoint_step: int, version: int) -> bool:
        """Count a finished run once; True if it failed."""
        if self.run_from < 0:
            self.run_from = checkpoint_step  # first look (e.g. after an operator restart)
        if driver is not DriverState.FINISHED or uid == self.judged:
            return False
        self.judged = uid
        if not failed:
            return False
        self.count = 1 if checkpoint_step > self.run_from else self.count + 1
        self.version, self.retry_due, self.error = version, False, message
        return True

    @property
    def pending(self) -> int:
        """What `decide` sees: none while a retry is due."""
        return 0 if self.retry_due else self.count


@dataclass
class Reported:
    """The last step written to the status; which of a driver's records are news."""

    step: int = 0
    notice: str | None = None

    def news(self, progress: Progress) -> list[StepSummary]:
        records = progress.records
        if records and records[-1].step < self.step:
            # The driver fell back to an older checkpoint (a corrupt version): those steps
            # run again, and are reported again.
            self.step = records[0].step - 1
        new = [r for r in records if r.step > self.step]
        if new:
            self.step = new[-1].step
        return new

    def new_notice(self, progress: Progress) -> str | None:
        if progress.notice and progress.notice != self.notice:
            self.notice = progress.notice
            return progress.notice
        return None
