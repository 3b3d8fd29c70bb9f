"""The simulated streaming step: fused learner, quota, the lower bound, the headline table."""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from rlhfless.api.spec import SchedulingSpec
from rlhfless.sim import experiments, runner
from rlhfless.sim.bound import step_bound
from rlhfless.sim.config import SimConfig
from rlhfless.sim.gpus import peak_gpus
from rlhfless.sim.runner import run_system
from rlhfless.sim.serverless import ServerlessSim
from rlhfless.sim.workload import synthetic


def _cfg(nodes: int = 1, **kw) -> SimConfig:
    cfg = SimConfig(gpu="h100", nodes=nodes, model="7b", prompts_per_step=32, group_size=4)
    n = cfg.max_replicas
    return replace(cfg, sched=SchedulingSpec(actors=n, max_actors=n), **kw)


def _work(cfg: SimConfig, epochs: int = 3, family: str = "longtail"):
    return synthetic(family, cfg.prompts_per_step, cfg.group_size, epochs, seed=1,
                     max_len=4096)


def test_fused_learner_learns_every_group_once_and_overlaps_the_rollout():
    cfg = _cfg(nodes=2)
    w = _work(cfg)
    sim = ServerlessSim(cfg, w)
    for epoch in range(w.epochs):
        prompts = np.arange(cfg.prompts_per_step)
        r = sim.step(epoch, epoch, prompts)
        work = cfg.learner_gpu_s(w.prompt_len[prompts], w.lengths[epoch, prompts], True)
        # every group's gradient work is done once, on the learner's GPUs
        assert r.extra["learner_busy_s"] * r.extra["learner_gpus"] == pytest.approx(work.sum())
        assert r.extra["learner_gpus"] % cfg.learner_gpu_step == 0
        # one optimizer step and the publish after the last group
        assert r.phases["finish"] == pytest.approx(cfg.learner_finish_s(
            int(r.extra["learner_gpus"])))
        assert r.step_s == pytest.approx(r.phases["sync"] + r.phases["gen"]
                                         + r.phases["learn_tail"] + r.phases["finish"])
    assert r.extra["overlap_s"] > 0  # the learner worked while actors still generated


def test_split_groups_generate_every_sample_once_and_learn_each_group_once():
    cfg = replace(_cfg(nodes=2), prompts_per_step=32, group_size=16)
    w = synthetic("dapo", 32, 16, 3, seed=1, max_len=20_000)
    sim = ServerlessSim(cfg, w)
    split = 0.0
    for epoch in range(w.epochs):
        prompts = np.arange(32)
        r = sim.step(epoch, epoch, prompts)
        split += r.extra["split_groups"]
        assert r.tokens == int(w.lengths[epoch].sum())  # each sample decoded exactly once
        work = cfg.learner_gpu_s(w.prompt_len[prompts], w.lengths[epoch, prompts], True)
        assert r.extra["learner_busy_s"] * r.extra["learner_gpus"] == pytest.approx(work.sum())
    assert split > 0  # the predicted long groups ran on several actors
    whole = ServerlessSim(replace(cfg, split_groups=False), w)
    for epoch in range(w.epochs):
        assert whole.step(epoch, epoch, np.arange(32)).extra["split_groups"] == 0


def test_quota_holds_over_the_whole_run_and_shared_may_exceed_it():
    cfg = _cfg(nodes=1, pool="quota")
    w = _work(cfg)
    sim = ServerlessSim(cfg, w)
    for epoch in range(w.epochs):
        sim.step(epoch, epoch, np.arange(cfg.prompts_per_step))
    assert peak_gpus(sim.lives) <= cfg.gpus  # prewarmed next-step actors included
    shared = replace(cfg, pool="shared")
    assert max(r.peak_gpus for r in run_system("rlhfless", shared, w)) >= 1


def test_streaming_beats_the_barrier_step_on_a_tail():
    cfg = _cfg(nodes=2)
    w = _work(cfg, epochs=4)
    stream = run_system("rlhfless", cfg, w)[2:]
    barrier = run_system("rlhfless", replace(cfg, step_mode="barrier"), w)[2:]
    assert np.mean([r.step_s for r in stream]) < np.mean([r.step_s for r in barrier])


def test_bound_is_below_every_system_and_above_the_longest_sample():
    cfg = _cfg(nodes=1)
    w = _work(cfg)
    prompts = np.arange(cfg.prompts_per_step)
    for system in ("verl", "rlhfless"):
        for r in run_system(system, cfg, w):
            b = step_bound(cfg, w.prompt_len[prompts], w.lengths[r.epoch, prompts], cfg.gpus)
            assert b.step_s <= r.step_s
    b = step_bound(cfg, w.prompt_len, w.lengths[0], cfg.gpus)
    k = int(np.argmax(w.lengths[0].max(axis=1)))
    alone = cfg.decode.segment_time(1, float(w.prompt_len[k]), int(w.lengths[0, k].max()))
    assert b.critical_s >= alone
    assert step_bound(cfg, w.prompt_len, w.lengths[0], 2 * cfg.gpus).work_s < b.work_s


def test_snapshot_cold_starts_bill_less_than_the_node_cache():
    cfg = _cfg(nodes=1)
    w = _work(cfg)
    cold = {name: sum(r.extra["cold_gpu_s"] for r in run_system(
        "rlhfless", cfg.with_cold_start(name), w)) for name in ("node-cache", "snapshot")}
    assert cold["snapshot"] < cold["node-cache"]


def test_planned_and_corrected_rollout_times_are_recorded():
    cfg = _cfg(nodes=1)
    w = _work(cfg, epochs=4)
    results = run_system("rlhfless", cfg, w)
    assert all(r.extra["planned_gen_s"] > 0 for r in results)
    assert results[0].extra["rollout_scale"] == 1.0  # nothing measured yet
    assert len(runner.warm(results, w)) == len(results) - runner.WARMUP_EPOCHS


@pytest.fixture
def small_experiments(monkeypatch):
    """The experiment grid on one node with small batches and 3 epochs (seconds)."""
    monkeypatch.setattr(experiments, "CLUSTERS", {"160xH100": ("h100", 1),
                                                  "16xL40S": ("l40s", 1)})
    monkeypatch.setattr(experiments, "BATCH", {k: (16, 4) if k[1] == "grpo" else (32, 1)
                                               for k in experiments.BATCH})
    monkeypatch.setattr(runner, "EPOCHS", 3)
    monkeypatch.setattr(runner.job_workload, "__defaults__", ("dapo", 3, 1))
    monkeypatch.setattr(experiments, "_CACHE", {})


def test_simulate_headline_writes_the_table_and_prints_one_line_per_row(
        small_experiments, tmp_path):
    from rlhfless.cli import app

    result = CliRunner().invoke(app, ["simulate", "--experiment", "headline",
                                      "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with (tmp_path / "headline.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["cluster", "model", "algo", "workload", "mode", "speedup",
                             "saving", "peak_gpus", "verl_gen_share", "step_over_bound"]
    assert len(rows) == 2 * len(experiments.HEADLINE_ROWS)
    assert [r["mode"] for r in rows[:len(rows) // 2]] == ["quota"] * (len(rows) // 2)
    quota_gpus = {"160xH100": 8, "16xL40S": 8}
    for r in rows:
        assert float(r["speedup"]) > 0 and float(r["step_over_bound"]) >= 1.0
        assert 0 < float(r["verl_gen_share"]) < 1
        if r["mode"] == "quota":
            assert int(r["peak_gpus"]) <= quota_gpus[r["cluster"]]
    lines = [ln for ln in result.output.splitlines() if " quota: speedup " in ln
             or " shared: speedup " in ln]
    assert len(lines) == len(rows)
    assert (tmp_path / "headline.png").stat().st_size > 1000
    # The details break each step into its phases and the bound into its two terms.
    with (tmp_path / "headline_details.csv").open() as fh:
        details = list(csv.DictReader(fh))
    for d in details:
        phases = sum(float(d[f"{k}_s"]) for k in ("sync", "gen", "learn_tail", "finish"))
        assert phases == pytest.approx(float(d["step_s"]), rel=1e-3)
        # a mean of per-step maxima is at least the larger mean
        assert float(d["bound_s"]) >= 0.999 * max(float(d["bound_critical_s"]),
                                                  float(d["bound_work_s"]))


def test_simulate_rejects_an_unknown_experiment(tmp_path):
    from rlhfless.cli import app

    result = CliRunner().invoke(app, ["simulate", "--experiment", "nope", "--out",
                                      str(tmp_path)])
    assert result.exit_code != 0
    assert "--experiment" in result.output and "headline" in result.output
    assert not list(tmp_path.iterdir())
