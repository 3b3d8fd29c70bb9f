"""Does the job fit its resources? The check `rlhfless validate`, `rlhfless run` and the
operator share: tensor parallelism against the model's heads, and the memory plan.

The operator calls it with `open_files=False`: it never opens a path named in a spec, so
only the shapes it can know without files are checked there (a tiny model, a model the
project ships); `rlhfless validate` and `run` also read a local HF config.json or GGUF header,
check that a reward model's directory holds one (`reward_config`), and size the scorer from
the reward model's own config.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhfless.model.memory import (
    Estimate,
    fit_errors,
    gpu_memory_bytes,
    placement_warnings,
    plan,
    scorer_plan,
    tensor_parallel_errors,
)
from rlhfless.model.reward_config import read_config, reward_model_errors
from rlhfless.model.shape import ModelShape, ShapeError, hf_config_shape, read_shape


@dataclass
class FitReport:
    errors: list[str] = field(default_factory=list)
    estimates: list[Estimate] = field(default_factory=list)
    shape: ModelShape | None = None
    note: str | None = None  # why nothing was checked, when nothing was
    warnings: list[str] = field(default_factory=list)  # allowed, but probably not meant
    invalid: list[str] = field(default_factory=list)  # files the spec names that will not do


def check_job(spec: Any, *, open_files: bool = True,
              gpu_memory: tuple[float, str] | None = None) -> FitReport:
    """Errors name the field to change; a shape that cannot be known skips the checks."""
    warnings = placement_warnings(spec)
    invalid = reward_model_errors(spec.reward) if open_files else []
    try:
        shape = read_shape(spec.model, open_files=open_files)
    except ShapeError as exc:
        return FitReport(note=f"model shape unknown ({exc}): memory and tensor-parallel "
                              "checks skipped", warnings=warnings, invalid=invalid)
    if shape is None:
        why = "not read by the operator" if not open_files else "its files are missing"
        return FitReport(note=f"model shape unknown ({why}): memory and tensor-parallel "
                              "checks skipped", warnings=warnings, invalid=invalid)
    gpu = gpu_memory or gpu_memory_bytes()
    estimates = plan(spec, shape, gpu)
    if open_files and not invalid and (scorer := _scorer_estimate(spec, gpu)) is not None:
        estimates.append(scorer)
    errors = tensor_parallel_errors(spec, shape) + fit_errors(spec, estimates)
    return FitReport(errors=errors, estimates=estimates, shape=shape, warnings=warnings,
                     invalid=invalid)


def _scorer_estimate(spec: Any, gpu_memory: tuple[float, str]) -> Estimate | None:
    """The reward model's scorer, sized from its own config.json (None: no reward model,
    or a config this code cannot size: the scorer then goes unchecked)."""
    model = getattr(spec.reward, "model", None)
    if model is None or (config := read_config(model.path)) is None:
        return None
    try:
        shape = hf_config_shape(config)
    except ShapeError:
        return None
    return scorer_plan(spec, shape, gpu_memory)
