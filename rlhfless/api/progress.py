"""What a job's driver pod tells the operator, through the job's progress ConfigMap.

The driver (its own pod, its own identity) may patch only that ConfigMap; the operator reads
it and stays the only writer of the RLHFJob's status. The document is small and bounded: the
driver's state, the last checkpointed step (where a new driver resumes), the last few step
summaries with the metrics the job's Prometheus series are made of, and the spend so far
(`cost`: what `status.cost` shows, and what the operator checks `spec.budget` against). The
operator parses it as untrusted input (`parse_progress` never raises; bounds on every field).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROGRESS_KEY = "progress.json"
MAX_RECORDS = 16  # steps kept, so an operator polling every few seconds misses none
MAX_TEXT = 4096
MAX_METRICS = 128
MAX_STAGES = 16
MAX_RECENT = 8

DriverState = Literal["starting", "running", "stopped", "done", "failed"]
log = logging.getLogger(__name__)

Amount = Annotated[float, Field(ge=0, allow_inf_nan=False)]
StageName = Annotated[str, Field(max_length=63)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", ser_json_inf_nan="constants")


class StepSummary(_Model):
    step: int = Field(..., ge=1)
    reward: float
    gpu_seconds_total: Amount
    weights_version: int = Field(..., ge=0)
    actors_alive: int = Field(0, ge=0)
    metrics: dict[Annotated[str, Field(max_length=128)], float] = Field(
        default_factory=dict, max_length=MAX_METRICS)

    @property
    def reward_mean(self) -> float:
        """As a StepRecord names it (the job's Prometheus series read either)."""
        return self.reward


class CostReport(_Model):
    """The spend over the steps the driver recorded (`rlhfless.cost.Ledger`, as data)."""

    steps: int = Field(0, ge=0)
    gpu_seconds: Amount = 0.0
    dollars: Amount | None = 0.0  # None: a stage's GPU type had no price
    stage_gpu_seconds: dict[StageName, Amount] = Field(default_factory=dict,
                                                       max_length=MAX_STAGES)
    stage_dollars: dict[StageName, Amount] = Field(default_factory=dict, max_length=MAX_STAGES)
    serverful_gpu_seconds: Amount = 0.0
    serverful_dollars: Amount | None = 0.0
    recent: list[tuple[Amount, Amount | None]] = Field(default_factory=list,
                                                       max_length=MAX_RECENT)
    planned: tuple[Amount, Amount | None] | None = None  # the plan's next step


class Progress(_Model):
    state: DriverState = "starting"
    steps: int = Field(0, ge=0)  # spec.steps of the run
    checkpoint_step: int = Field(0, ge=0)  # last checkpointed step: where a new driver resumes
    records: list[StepSummary] = Field(default_factory=list, max_length=MAX_RECORDS)
    cost: CostReport | None = None  # None: no driver has reported its spend yet
    error: str | None = Field(None, max_length=MAX_TEXT)
    notice: str | None = Field(None, max_length=MAX_TEXT)
    updated_at: float = 0.0

    @property
    def last(self) -> StepSummary | None:
        return self.records[-1] if self.records else None

    def dump(self) -> str:
        return self.model_dump_json()


def parse_progress(data: Mapping[str, str] | None) -> Progress:
    """The progress in a ConfigMap's `data`; an empty or unreadable one reads as no
    progress (logged), never as an exception."""
    text = (data or {}).get(PROGRESS_KEY) or "{}"
    try:
        return Progress.model_validate_json(text)
    except (ValidationError, ValueError) as exc:
        log.warning("unreadable driver progress ignored: %s", str(exc)[:300])
        return Progress()
