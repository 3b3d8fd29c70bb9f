"""Prewarm: start each phase's functions so their cold start ends as the phase begins.

A synchronous RL step is a cycle of phases, each run by some stages: the driver passes its
job's (`StageTable.phases()`: rollout → learn, the learn stages already working on groups
during the rollout); the default is the barrier step the simulator models (rollout → score →
train). From measured phase durations and cold starts:

* keep warm or release: after its phase a stage is idle for ``gap`` = the other phases'
  durations. Keeping it costs ``gap`` GPU-seconds per GPU; releasing and prewarming it costs
  its cold start plus ``margin_s``. A stage is released (scaled to zero) after its phase
  when ``gap > cold_start + margin_s``, else kept warm;
* start time of a released stage: ``cold_start + margin_s`` before its phase begins, walking
  back through the cycle; given as (phase during which to start it, seconds after that
  phase's start). If that lead is longer than the whole gap, it starts right after its own
  phase ends (it is then also kept warm, see above), and ``exposed_s`` says how much cold
  start cannot be hidden.

Phases missing from ``phase_durations`` count as 0 s; stages missing from ``cold_starts``
as 0 s cold start. A stage may belong to one phase only.

`keep_or_prewarm` makes the same choice per instance, for instances released at different
times (e.g. actors cut at different moments) that are needed again at one time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PhaseSpec = tuple[str, tuple[str, ...]]

DEFAULT_PHASES: tuple[PhaseSpec, ...] = (
    ("rollout", ("actor",)),
    ("score", ("reference", "reward", "critic")),
    ("train", ("trainer",)),
)


@dataclass(frozen=True)
class PrewarmPlan:
    start_phase: dict[str, str]  # released stage -> phase during which to start it
    start_offsets: dict[str, float]  # released stage -> seconds after start_phase begins
    scale_to_zero_after: dict[str, list[str]]  # phase -> stages to release when it ends
    keep_warm: list[str]  # stages cheaper to keep warm across their idle gap
    exposed_s: dict[str, float]  # cold start that no start time can hide (0 if hidden)


def prewarm_plan(phase_durations: Mapping[str, float], cold_starts: Mapping[str, float],
                 phases: Sequence[PhaseSpec] = DEFAULT_PHASES,
                 margin_s: float = 0.0) -> PrewarmPlan:
    if not phases:
        raise ValueError("no phases")
    if margin_s < 0:
        raise ValueError("margin_s must be >= 0")
    names = [name for name, _ in phases]
    if len(set(names)) != len(names):
        raise ValueError("phase names must be unique")
    stages = [s for _, ss in phases for s in ss]
    if len(set(stages)) != len(stages):
        raise ValueError("a stage may belong to one phase only")
    durations = [max(0.0, float(phase_durations.get(name, 0.0))) for name in names]
    cycle = sum(durations)
    starts = [sum(durations[:k]) for k in range(len(phases))]

    start_phase: dict[str, str] = {}
    start_offsets: dict[str, float] = {}
    release: dict[str, list[str]] = {name: [] for name in names}
    keep_warm: list[str] = []
    exposed: dict[str, float] = {}
    for k, (phase, phase_stages) in enumerate(phases):
        gap = cycle - durations[k]
        for stage in phase_stages:
            lead = max(0.0, float(cold_starts.get(stage, 0.0))) + margin_s
            exposed[stage] = max(0.0, lead - gap)
            if gap <= lead:
                keep_warm.append(stage)
                continue
            release[phase].append(stage)
            # Walk back `lead` seconds from this phase's start around the cycle.
            t = (starts[k] - lead) % cycle
            p = max(i for i in range(len(phases)) if starts[i] <= t + 1e-12)
            start_phase[stage] = names[p]
            start_offsets[stage] = max(0.0, t - starts[p])
    return PrewarmPlan(start_phase=start_phase, start_offsets=start_offsets,
                       scale_to_zero_after=release, keep_warm=keep_warm, exposed_s=exposed)


def keep_or_prewarm(releases: Sequence[float], n_needed: int, ready_by: float,
                    lead: float) -> tuple[list[float], float | None]:
    """The cheaper way to have `n_needed` instances ready at `ready_by`, per instance: stay
    alive from its own release (billed ``ready_by − release``), or scale to zero and be
    prewarmed `lead` seconds before (cold start + margin, billed ``lead``).

    Returns the releases of the instances kept warm (latest first) and when to prewarm the
    rest (None if none is needed).
    """
    latest = sorted(releases, reverse=True)[:max(0, n_needed)]
    keep = [r for r in latest if ready_by - r <= lead]
    return keep, (ready_by - lead if len(keep) < n_needed else None)
