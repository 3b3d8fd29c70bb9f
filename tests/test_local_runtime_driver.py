"""The embedded runtime end to end: real function processes on loopback, the real driver.

Faults: an actor killed mid-stream (its unfinished groups re-run elsewhere, every sample
once), a learner killed between adds (the driver re-sends the step's groups from the store
shards; the update is bit-identical to the uninterrupted one)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from rlhfless.driver import Driver
from rlhfless.driver.records import MetricsLog
from rlhfless.runtime.base import StreamBroken
from rlhfless.runtime.local import LocalRuntime
from tests.conftest import tiny_job


async def _run(job, run_dir: Path, runtime_cls=LocalRuntime, **runtime_kw) -> tuple[int, list]:
    async with runtime_cls(job, run_dir / "store", run_dir, **runtime_kw) as runtime:
        completed = await Driver(job, runtime, run_dir).run()
    return completed, runtime.meter()


def test_tiny_grpo_learns_through_function_processes(tmp_path):
    job = tiny_job(
        "learn", steps=14, algorithm={"groupSize": 8, "lr": 0.004},
        model={"source": "tiny", "tiny": {"nLayer": 2, "nEmbd": 64, "nHead": 4,
                                          "nPositions": 96, "seed": 0}},
        dataset={"kind": "repeat", "size": 2, "promptsPerStep": 2},
        generation={"maxNewTokens": 12},
        reward={"name": "target_char", "args": {"char": "a"}},
        scheduling={"prewarm": False, "keepAliveS": 120},
    )
    completed, _ = asyncio.run(_run(job, tmp_path))
    assert completed == 14
    rows = MetricsLog(tmp_path / "metrics.jsonl").read()
    rewards = [r["reward/mean"] for r in rows]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.1, rewards
    assert [r["step"] for r in rows] == list(range(1, 15))
    assert rows[-1]["weights_version"] == 14
    for key in ("timing_s/gen", "timing_s/ref", "timing_s/reward", "timing_s/update_actor",
                "timing_s/step", "timing_s/overlap", "timing_share/after_rollout",
                "perf/throughput", "cost/gpu_seconds", "idle_ratio/actor",
                "cost/gpu_seconds/learner"):
        assert key in rows[-1], key
    assert 0 < rows[-1]["timing_share/after_rollout"] < 1
    lanes = {t["stage"]: t for t in rows[-1]["timeline"]}
    assert lanes["learner"]["busy"] and lanes["actor"]["busy"]  # busy spans per instance


def test_resume_continues_at_the_next_step(tmp_path):
    job = tiny_job("resume", steps=2)
    assert asyncio.run(_run(job, tmp_path))[0] == 2
    job.spec.steps = 3
    completed, usages = asyncio.run(_run(job, tmp_path))
    assert completed == 3
    rows = MetricsLog(tmp_path / "metrics.jsonl").read()
    assert [r["step"] for r in rows] == [1, 2, 3]
    checkpoint = json.loads((tmp_path / "checkpoint.json").read_text())
    assert checkpoint["step"] == 3 and checkpoint["weights_version"] == 3
    # The scheduler's learned state travels with the checkpoint: every prompt seen is known.
    assert len(checkpoint["scheduler"]["predictor"]["mean"]["ewma"]) == job.spec.dataset.size
    assert len(checkpoint["scheduler"]["predictor"]["max"]["ewma"]) == job.spec.dataset.size
    # The resumed run did one step: one learner instance.
    assert sum(1 for u in usages if u.stage == "learner") == 1


class _KillingRuntime(LocalRuntime):
    """Kills (SIGKILL) the actor instance serving the first actor stream as soon as its first
    frame arrives, and notes whether that stream then broke (it may have ended first)."""

    killed: list[str]
    broke = False

    async def invoke_stream(self, stage, payload):
        first = stage == "actor" and not getattr(self, "killed", None)
        if first:
            self.killed = ["pending"]
        try:
            async for instance, frame in super().invoke_stream(stage, payload):
                yield instance, frame
                if first and self.killed == ["pending"]:  # it has started streaming: kill it
                    self.killed = [instance]
                    proc = next(i for i in self.instances("actor")
                                if i.name == instance).process
                    os.kill(proc.pid, signal.SIGKILL)
        except StreamBroken:
            self.broke = self.broke or first
            raise


def test_actor_killed_mid_stream_has_its_groups_rerun_every_sample_once(tmp_path):
    # 64 tokens a response: the actor is still generating long after its first frame left,
    # even when a busy machine delays the kill.
    job = tiny_job("kill", steps=1, generation={"maxNewTokens": 64},
                   scheduling={"actors": 2, "costAware": False, "prewarm": False})
    g, prompts = job.spec.algorithm.group_size, job.spec.dataset.prompts_per_step

    async def go():
        async with _KillingRuntime(job, tmp_path / "store", tmp_path) as runtime:
            completed = await Driver(job, runtime, tmp_path).run()
            return completed, runtime.killed, runtime.broke, runtime.meter()

    completed, killed, broke, usages = asyncio.run(go())
    assert completed == 1 and len(killed) == 1 and killed[0].startswith("actor-")
    assert broke  # the stream broke mid-way (not a stream that had already ended)
    dead = [u for u in usages if u.instance == killed[0]]
    assert dead and dead[0].ended_at is not None
    row = MetricsLog(tmp_path / "metrics.jsonl").read()[0]
    assert row["sched/rerun_samples"] > 0  # re-run elsewhere...
    assert row["train/num_tokens"] == row["perf/total_response_tokens"]
    # ...and every (prompt, sample) reached the learner exactly once: G per prompt.
    assert row["response_length/mean"] * g * prompts == pytest.approx(
        row["perf/total_response_tokens"])


class _LearnerKillingRuntime(LocalRuntime):
    """Kills the learner process just before the step's third add reaches it."""

    adds = 0
    killed = False

    async def invoke(self, stage, payload):
        if stage == "learner" and payload.get("op") == "add":
            self.adds += 1
            if self.adds == 3 and not self.killed:
                self.killed = True
                for inst in self.instances("learner"):
                    if inst.alive:
                        os.kill(inst.process.pid, signal.SIGKILL)
                        await asyncio.to_thread(inst.process.wait)
        return await super().invoke(stage, payload)


def _weights_digest(run_dir: Path, version: int) -> str:
    manifest = json.loads((run_dir / "store" / f"v{version}" / "manifest.json").read_text())
    return manifest["files"]["model.safetensors"]["sha256"]


def test_learner_restarted_between_adds_loses_nothing(tmp_path):
    # Barrier order makes the add order the same in both runs: the updates must then be
    # bit-identical, the second learner rebuilt from the store and the step's shards.
    job = tiny_job("relearn", steps=1, scheduling={"streaming": False, "prewarm": False,
                                                   "actors": 1, "costAware": False})
    asyncio.run(_run(job, tmp_path / "plain"))
    completed, usages = asyncio.run(_run(job, tmp_path / "killed",
                                         runtime_cls=_LearnerKillingRuntime))
    assert completed == 1
    assert sum(1 for u in usages if u.stage == "learner") == 2  # a fresh learner took over
    row = MetricsLog(tmp_path / "killed" / "metrics.jsonl").read()[0]
    assert row["sched/learner_recoveries"] == 1
    assert _weights_digest(tmp_path / "plain", 1) == _weights_digest(tmp_path / "killed", 1)


def _process_lifetimes(log_dir: Path) -> dict[str, float]:
    """What each function process says of its own life (written when it exits)."""
    lives = {}
    for log in log_dir.glob("*.log"):
        for line in log.read_text().splitlines():
            if line.startswith("rlhfless-instance-exit "):
                info = json.loads(line.split(" ", 1)[1])
                lives[log.stem] = info["ended_at"] - info["started_at"]
    return lives


def test_functions_scale_to_zero_and_meter_alive_time(tmp_path):
    job = tiny_job("zero", steps=2, scheduling={"keepAliveS": 0.0, "prewarm": False})
    _, usages = asyncio.run(_run(job, tmp_path))
    rows = MetricsLog(tmp_path / "metrics.jsonl").read()
    for row in rows:
        lives = {t["instance"]: t for t in row["timeline"] if t["start"] >= 0}
        actors = [t for t in lives.values() if t["stage"] == "actor"]
        learners = [t for t in lives.values() if t["stage"] == "learner"]
        assert actors and learners
        # Idle instances go at once: no actor outlives the step's last learner call.
        assert max(a["end"] for a in actors) <= max(t["end"] for t in learners) + 0.5
    assert all(u.ended_at is not None for u in usages)  # all at zero after the run
    lives = _process_lifetimes(tmp_path / "logs")
    assert set(lives) == {u.instance for u in usages}
    metered = sum(u.alive_seconds(0.0) for u in usages)
    assert metered == pytest.approx(sum(lives.values()), rel=0.05)
    gpu_seconds = sum(u.gpu_seconds(0.0) for u in usages)
    assert gpu_seconds == pytest.approx(sum(
        lives[u.instance] * u.gpus for u in usages), rel=0.05)
