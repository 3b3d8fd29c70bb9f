"""The local runtime hands each instance its own GPUs (simulated device ids: no GPU needed).

Real function processes on loopback; RLHFLESS_GPUS stands in for the machine's GPUs, and
each process's CUDA_VISIBLE_DEVICES is read back from /proc.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from pathlib import Path

import pytest

from rlhfless.driver import Driver
from rlhfless.driver.records import MetricsLog
from rlhfless.runtime.base import InvocationError
from rlhfless.runtime.local import LocalRuntime
from tests.conftest import tiny_job

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads process environments from /proc")


def visible_devices(pid: int) -> str | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for entry in env:
        if entry.startswith(b"CUDA_VISIBLE_DEVICES="):
            return entry.split(b"=", 1)[1].decode()
    return None


async def until(condition, timeout: float = 120.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_a_step_uses_every_gpu_and_never_shares_one(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFLESS_GPUS", "0,1,2")
    job = tiny_job("pool", steps=1, dataset={"kind": "repeat", "size": 3, "promptsPerStep": 3},
                   scheduling={"actors": 3, "maxActors": 3, "costAware": False,
                               "prewarm": False, "keepAliveS": 60},
                   resources={"actor": {"gpus": 1}, "reward": {"gpus": 0},
                              "learner": {"gpus": 2}})

    async def go():
        async with LocalRuntime(job, tmp_path / "store", tmp_path) as runtime:
            return await Driver(job, runtime, tmp_path).run(), runtime.meter()

    completed, usages = asyncio.run(go())
    assert completed == 1
    by_name = {u.instance: u for u in usages}
    actors = [u for u in usages if u.stage == "actor"]
    assert len(actors) == 3 and {d for u in actors for d in u.devices} == set("012")
    for u in usages:  # billed what it was given
        assert u.gpus == len(u.devices) == job.spec.stages[u.stage].gpus
    # Two instances alive at the same time never hold the same GPU.
    for a, b in itertools.combinations(usages, 2):
        if set(a.devices) & set(b.devices):
            assert a.ended_at <= b.started_at or b.ended_at <= a.started_at, (a, b)
    # The step's timeline row says which instance held which GPUs.
    (row,) = MetricsLog(tmp_path / "metrics.jsonl").read()
    for lane in row["timeline"]:
        assert lane.get("gpus", []) == list(by_name[lane["instance"]].devices)
    assert any(lane["stage"] == "learner" and len(lane["gpus"]) == 2 for lane in row["timeline"])


def test_a_start_waits_for_gpus_and_idle_instances_of_other_stages_make_room(
        tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFLESS_GPUS", "6,7")
    job = tiny_job("wait", resources={"actor": {"gpus": 2}, "reward": {"gpus": 0},
                                      "learner": {"gpus": 1}},
                   scheduling={"actors": 1, "maxActors": 1, "keepAliveS": 600})

    async def go():
        async with LocalRuntime(job, tmp_path / "store", tmp_path) as runtime:
            await asyncio.to_thread(Driver(job, runtime, tmp_path).prepare)
            await asyncio.gather(runtime.scale("actor", 1), runtime.scale("reward", 1))
            (actor,) = runtime.instances("actor")
            (reward,) = runtime.instances("reward")
            assert visible_devices(actor.process.pid) == "6,7"
            assert visible_devices(reward.process.pid) == ""  # a CPU stage sees no GPU
            # Scaled up for work to come, the actor is no spare: a start of another stage
            # waits for it instead of stopping it before its first request.
            learner = asyncio.create_task(runtime.scale("learner", 1))
            await until(lambda: runtime._pool.waiting())
            assert actor.reserved and actor.alive and not runtime.instances("learner")
            actor.busy, actor.reserved = True, False  # serving a request: not stopped either
            async with runtime._changed:
                runtime._changed.notify_all()
            await asyncio.sleep(0)
            assert not runtime.instances("learner") and actor.alive  # waits, does not fail
            actor.busy = False  # the request is done: now idle, it may make room
            async with runtime._changed:
                runtime._changed.notify_all()
            await learner
            (started,) = runtime.instances("learner")
            assert actor.ended_at is not None and actor.ended_at <= started.started_at
            assert visible_devices(started.process.pid) == "6"
            return runtime.meter()

    usages = asyncio.run(go())
    assert {u.instance: u.devices for u in usages} == {
        "actor-0": ("6", "7"), "reward-1": (), "learner-2": ("6",)}


def test_a_stage_asking_for_more_gpus_than_exist_is_an_error_at_start(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFLESS_GPUS", "0,1")
    job = tiny_job("big", resources={"learner": {"gpus": 4}})

    async def go():
        async with LocalRuntime(job, tmp_path / "store", tmp_path):
            pass

    with pytest.raises(InvocationError, match=r"learner: asks for 4 GPUs .*resources.learner"
                                              r".gpus.* has 2"):
        asyncio.run(go())


def test_slots_share_a_gpu_and_bill_a_share(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFLESS_GPUS", "0")
    monkeypatch.setenv("RLHFLESS_GPU_SLOTS", "2")
    job = tiny_job("share", scheduling={"actors": 2, "maxActors": 2})

    async def go():
        async with LocalRuntime(job, tmp_path / "store", tmp_path) as runtime:
            await asyncio.to_thread(Driver(job, runtime, tmp_path).prepare)
            await runtime.scale("actor", 2)
            envs = [Path(f"/proc/{i.process.pid}/environ").read_bytes()
                    for i in runtime.instances("actor")]
            return runtime.meter(), envs

    usages, envs = asyncio.run(go())
    assert [u.devices for u in usages] == [("0",), ("0",)]
    assert [u.gpus for u in usages] == [0.5, 0.5]
    assert all(b"RLHFLESS_GPU_MEMORY_SHARE=0.5000" in e for e in envs)
