"""Sample-level units: groups too long for one actor split over several, and the plan on them."""

from __future__ import annotations

import numpy as np
import pytest

from rlhfless.scheduling.learner import LearnerProfile
from rlhfless.scheduling.planning import planning_workload
from rlhfless.scheduling.profile import Profile
from rlhfless.scheduling.step import plan_step
from rlhfless.scheduling.units import (
    SPLIT_SLACK,
    SampleUnit,
    bin_entries,
    group_finish,
    part_sizes,
    sample_units,
    single_sample_times,
    whole_groups,
)
from rlhfless.scheduling.workmodel import unit_times

PROF = Profile(tpot_base_s=0.008, tpot_per_seq_s=2e-4, prefill_tok_per_s=30_000.0,
               tpot_per_ctx_s=2e-8, cold_start_s=11.0, keep_alive_s=1.0, max_batch=256,
               kv_tokens=1e6)
LEARNER = LearnerProfile(gpu_s_per_token=2e-3, init_s=10.0, load_gpu_s=40.0, finish_s=2.0,
                         min_gpus=4, max_gpus=64, gpu_step=4)


def _work(seed: int = 0, groups: int = 24, g: int = 16):
    """Short groups plus two that run long throughout (mean near their longest sample)."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(200, 800, groups)
    top = mean * rng.uniform(1.5, 3.0, groups)
    mean[:2], top[:2] = 7000.0, 8000.0
    return planning_workload(mean, top, g, rng.uniform(100, 400, groups))


def test_part_sizes_are_as_equal_as_possible():
    assert part_sizes(16, 3) == [6, 5, 5]
    assert part_sizes(16, 16) == [1] * 16
    assert sum(part_sizes(7, 2)) == 7


def test_only_groups_long_throughout_are_split_and_every_sample_runs_once():
    work = _work()
    parts, units = sample_units(work, PROF)
    assert len(parts) == len(units) > len(work)
    split = {u.group for u in units if len(u.samples) < 16}
    assert split == {0, 1}  # the short groups stay whole
    for k in range(len(work)):
        samples = sorted(i for u in units if u.group == k for i in u.samples)
        assert samples == list(range(16))
    # Every part keeps its group's longest sample; tokens and reads are shared out.
    for k in (0, 1):
        idx = [i for i, u in enumerate(units) if u.group == k]
        assert np.all(parts.lmax[idx] == work.lmax[k])
        assert parts.tokens[idx].sum() == pytest.approx(work.tokens[k])
        assert parts.ctx[idx].sum() == pytest.approx(work.ctx[k])
    # Each part alone fits within the slack over the batch's longest single sample.
    limit = (1 + SPLIT_SLACK) * single_sample_times(work, PROF).max()
    assert unit_times(parts, PROF).max() <= limit * (1 + 1e-9)
    assert unit_times(work, PROF).max() > limit  # ... which the whole groups did not


def test_no_slack_keeps_every_group_whole_and_group_finish_is_the_last_part():
    work = _work()
    same, units = sample_units(work, PROF, slack=None)
    assert same is work and units == whole_groups(work)
    _, units = sample_units(work, PROF)
    finish = np.arange(len(units), dtype=float)
    done = group_finish(units, finish, len(work))
    for k in range(len(work)):
        assert done[k] == max(f for u, f in zip(units, finish, strict=True) if u.group == k)


def test_a_split_plan_covers_every_sample_and_is_not_slower():
    work = _work(seed=1)
    tokens = work.tokens + work.prefill
    common = dict(lam=0.5, max_actors=32, quota=64)
    whole = plan_step(work, tokens, PROF, LEARNER, **common)
    split = plan_step(work, tokens, PROF, LEARNER, split_groups=True, **common)
    assert not whole.split and split.split
    seen = sorted((u.group, i) for b in split.unit_bins() for u in b for i in u.samples)
    assert seen == [(k, i) for k in range(len(work)) for i in range(16)]
    # The long groups no longer decide the rollout alone.
    assert split.rollout_s < whole.rollout_s
    assert split.learner.end_s < whole.learner.end_s


def test_runaway_floor_plans_every_actor_up_to_the_longest_sample():
    work = _work(seed=2)
    tokens = work.tokens + work.prefill
    floor = plan_step(work, tokens, PROF, LEARNER, lam=0.5, max_actors=32, quota=64)
    bare = plan_step(work, tokens, PROF, LEARNER, lam=0.5, max_actors=32, quota=64,
                     runaway_floor=False)
    longest = float(single_sample_times(work, PROF).max())
    assert floor.rollout_s >= longest
    # Filling bins up to the critical path needs no more actors than splitting finer.
    assert floor.n <= bare.n
    raised = work.with_lmax_floor(5000.0)
    assert np.all(raised.lmax >= 5000.0) and np.all(raised.tokens == work.tokens)


def test_bin_entries_merge_parts_on_one_actor_and_name_whole_groups_by_index():
    units = [SampleUnit(0, (0, 1, 2, 3)), SampleUnit(1, (0, 1)), SampleUnit(1, (2, 3)),
             SampleUnit(2, (0, 1)), SampleUnit(2, (2, 3))]
    assert bin_entries(units, [[0, 1, 2], [3], [4]], 4) == [[0, 1], [(2, (0, 1))],
                                                            [(2, (2, 3))]]
    work, tokens, prof, learner, lam, n = _plan_args()
    plan = plan_step(work, tokens, prof, learner, lam=lam, max_actors=n, quota=64,
                     split_groups=True)
    entries = bin_entries(plan.units, plan.bins, 16)
    assert len(entries) == plan.n
    seen = sorted((e, i) if isinstance(e, int) else (e[0], i)
                  for b in entries for e in b
                  for i in (range(16) if isinstance(e, int) else e[1]))
    assert seen == [(k, i) for k in range(24) for i in range(16)]
    assert any(not isinstance(e, int) for b in entries for e in b)  # the long groups split


def _plan_args():
    work = _work(seed=1)
    return work, work.tokens + work.prefill, PROF, LEARNER, 0.5, 32
