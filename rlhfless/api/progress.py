"""What a job's driver pod tells the operator, through the job's progress ConfigMap.

The driver (its own pod, its own identity) may patch only that ConfigMap; the operator reads
it and stays the only writer of the RLHFJob's status. The document is small and bounded: the
driver's state, the last checkpointed step (where a new driver resumes) and the last few
step summaries with the few metrics the operator exports. The operator parses it as
untrusted input (`parse_progress` never raises; bounds on every field).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROGRESS_KEY = "progress.json"
MAX_RECORDS = 16  # steps kept, so an operator polling every few seconds misses none
MAX_TEXT = 4096

# The per-step metrics the driver publishes and the operator exports (operator/metrics.py).
KEY_STEP_SECONDS = "timing_s/step"
KEY_GPU_SECONDS_PREFIX = "cost/gpu_seconds/"
KEY_IDLE_PREFIX = "idle_ratio/"
KEY_ACTORS_CHOSEN = "sched/actors"
KEY_LENGTH_MAE = "sched/pred_mae_tokens"
_EXPORTED = (KEY_STEP_SECONDS, KEY_ACTORS_CHOSEN, KEY_LENGTH_MAE)
_EXPORTED_PREFIXES = (KEY_GPU_SECONDS_PREFIX, KEY_IDLE_PREFIX)
MAX_METRICS = 64

DriverState = Literal["starting", "running", "stopped", "done", "failed"]
log = logging.getLogger(__name__)


def exported_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The subset of a step's metrics the operator exports."""
    out = {k: float(v) for k, v in metrics.items()
           if k in _EXPORTED or k.startswith(_EXPORTED_PREFIXES)}
    return dict(sorted(out.items())[:MAX_METRICS])


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", ser_json_inf_nan="constants")


class StepSummary(_Model):
    step: int = Field(..., ge=1)
    reward: float
    gpu_seconds_total: float = Field(..., ge=0)
    weights_version: int = Field(..., ge=0)
    actors_alive: int = Field(0, ge=0)
    metrics: dict[str, float] = Field(default_factory=dict, max_length=MAX_METRICS)


class Progress(_Model):
    state: DriverState = "starting"
    steps: int = Field(0, ge=0)  # spec.steps of the run
    checkpoint_step: int = Field(0, ge=0)  # last checkpointed step: where a new driver resumes
    records: list[StepSummary] = Field(default_factory=list, max_length=MAX_RECORDS)
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
