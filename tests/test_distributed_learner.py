"""The multi-rank learner on the CPU: 2 gloo ranks (FSDP2) against the plain 1-rank learner,
and the rank group's lockstep and failure handling."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhfless.train.distributed import share_of, split_evenly
from rlhfless.train.ranks import RankGroup, RanksFailed

REPO = Path(__file__).resolve().parents[1]
CASE = re.compile(r"^case=(\S+) ranks=2 max \|dw\|: (\S+) moved: (\S+) "
                  r"grad_norm: (\S+) / (\S+)(?: restart bit-identical: (\w+))?$")


def test_split_evenly_and_stand_ins():
    assert [list(r) for r in split_evenly(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [list(r) for r in split_evenly(1, 3)] == [[0], [], []]
    assert share_of(["a", "b", "c"], 1, 2) == (["c"], False)
    # A rank with nothing to do computes the first item with weight 0.
    assert share_of(["a"], 2, 3) == (["a"], True)
    assert share_of([], 0, 2) == ([], False)
    with pytest.raises(ValueError, match="world"):
        split_evenly(3, 0)


def test_two_gloo_ranks_give_the_one_rank_update():
    """GRPO (KL, entropy, 1 and 3 mini-batches, a rank left with a stand-in, clipping under
    gradient checkpointing) and PPO with a critic: same weights as one rank within 1e-5,
    same gradient norm, and a learner rebuilt mid-step lands on bit-identical weights."""
    result = subprocess.run(
        [sys.executable, "benchmarks/distributed_learner.py", "--cases"], cwd=REPO,
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    cases = {}
    for line in result.stdout.splitlines():
        match = CASE.match(line)
        if match:
            cases[match[1]] = match.groups()[1:]
    assert set(cases) == {"grpo-kl-entropy", "grpo-3-minibatches", "ppo-2-epochs",
                          "grpo-stand-in", "grpo-clipped-checkpointing"}, result.stdout
    for name, (dw, moved, norm1, norm2, _restart) in cases.items():
        assert float(dw) <= 1e-5, (name, dw)
        assert float(moved) > 5e-4, (name, moved)  # the step really changed the weights
        assert float(norm2) == pytest.approx(float(norm1), rel=1e-5), name
    assert cases["grpo-3-minibatches"][4] == "True"


class Echo:
    """A rank group target: what every rank did, request errors, a rank that dies."""

    request_errors = (ValueError,)

    def __init__(self, config: dict[str, Any], ranks: Any) -> None:
        self.ranks = ranks
        self.offset = config["offset"]

    def add(self, x: float) -> list[float]:
        # A collective: every rank must be here for rank 0 to return.
        return self.ranks.sum([x + self.offset + self.ranks.rank])

    def refuse(self, x: int) -> None:
        raise ValueError(f"bad request {x}")

    def die(self) -> None:
        if self.ranks.rank == 1:
            os._exit(3)


def _start(failures: list[str]) -> RankGroup:
    return RankGroup.start(2, "test_distributed_learner:Echo", {"offset": 10},
                           device_type="cpu", on_failure=failures.append, threads=1)


def test_rank_group_runs_every_call_on_every_rank_and_survives_request_errors():
    failures: list[str] = []
    group = _start(failures)
    try:
        assert group.world == 2
        assert group.call("add", 1.5) == [(1.5 + 10) * 2 + 1]
        with pytest.raises(ValueError, match="bad request 7"):
            group.call("refuse", 7)
        assert group.call("add", 0.0) == [21.0]  # still in step after the refused request
    finally:
        group.close()
    assert failures == []


def test_a_rank_that_dies_breaks_the_group_and_reports_it():
    failures: list[str] = []
    reported = threading.Event()
    group = RankGroup.start(2, "test_distributed_learner:Echo", {"offset": 0},
                            device_type="cpu", threads=1,
                            on_failure=lambda why: (failures.append(why), reported.set()))
    try:
        with pytest.raises(RanksFailed, match="rank 1"):
            group.call("die")
        assert reported.wait(60)
        assert "rank 1" in failures[0]
        with pytest.raises(RanksFailed):
            group.call("add", 1.0)  # refused at once, no collective with a dead rank
    finally:
        group.close()


def _materialized(tmp_path: Path, name: str, gpus: int, algo: str):
    from rlhfless.model.materialize import materialize_base
    from rlhfless.store import WeightStore
    from tests.conftest import tiny_job

    algorithm = {"name": algo, "advantage": "gae"} if algo == "ppo" else {}
    job = tiny_job(resources={"learner": {"gpus": gpus}}, algorithm=algorithm)
    store = WeightStore(tmp_path / name)
    materialize_base(job.spec.model, store)
    return job, store


def _version_files(store, version: int) -> dict[str, Any]:
    from safetensors.torch import load_file

    folder = store.path(version)
    return {file.name: load_file(file) for file in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_a_learner_instance_with_two_ranks_serves_and_publishes_what_one_rank_does(
        tmp_path, algo):
    """`resources.learner.gpus: 2` on the CPU: rank 0 serves HTTP and one gloo follower runs
    the same requests. Refusals keep the ranks in step; the version it writes has the same
    files, tensors and aliases as a one-rank learner's, the same weights within 1e-5; and
    its optimizer state resumes on one rank."""
    from starlette.testclient import TestClient

    from rlhfless.api.wire import GROUPS_MISSING, STEP_NOT_OPEN
    from rlhfless.functions.app import create_app
    from rlhfless.functions.learner_ranks import RankedLearnerHandler
    from rlhfless.functions.serve import build_handler

    def serve(handler):
        return TestClient(create_app(handler, token="t"), headers={"Authorization": "Bearer t"})

    one_job, one_store = _materialized(tmp_path, "one", 1, algo)
    two_job, two_store = _materialized(tmp_path, "two", 2, algo)
    one = serve(build_handler("learner", one_job, one_store))
    ranked = build_handler("learner", two_job, two_store)
    assert isinstance(ranked, RankedLearnerHandler) and ranked.group.world == 2
    two = serve(ranked)

    def call(client, body):
        reply = client.post("/invoke", json=body)
        return reply.status_code, reply.json()

    def group(gid, rewards):
        return {"group_id": gid, "prompt_ids": [80, 81],
                "responses": [[65, 66], [67], [68, 69, 70], [71]], "rewards": rewards}

    try:
        replies = []
        for client in (one, two):
            head = {"weights_version": 0, "step": 1}
            status, body = call(client, {"op": "add", "request_id": "a", **head,
                                         "group": group("p0", [1.0, 0, 0, 1.0])})
            assert status == 409 and body["code"] == STEP_NOT_OPEN
            call(client, {"op": "begin", "request_id": "b", **head, "group_ids": ["p0", "p1"]})
            call(client, {"op": "add", "request_id": "a0", **head,
                          "group": group("p0", [1.0, 0, 0, 1.0])})
            status, body = call(client, {"op": "finish", "request_id": "f0", **head})
            assert status == 409 and body["code"] == GROUPS_MISSING
            call(client, {"op": "add", "request_id": "a1", **head,
                          "group": group("p1", [0, 1.0, 0.5, 0])})
            status, body = call(client, {"op": "finish", "request_id": "f1", **head})
            assert status == 200 and body["weights_version"] == 1, body
            replies.append(body["stats"])
        assert set(replies[0]) == set(replies[1])
        assert replies[1]["loss"] == pytest.approx(replies[0]["loss"], rel=1e-4, abs=1e-6)
        assert two_store.versions() == [0, 1] and ranked.loaded_version() == 1
        meta1, meta2 = one_store.meta(1), two_store.meta(1)
        assert set(meta1) == set(meta2) and meta1["request_sha256"] == meta2["request_sha256"]
        assert {f: m.get("aliases") for f, m in two_store.manifest(1)["files"].items()} == \
            {f: m.get("aliases") for f, m in one_store.manifest(1)["files"].items()}
        w1, w2 = _version_files(one_store, 1), _version_files(two_store, 1)
        assert list(w1) == list(w2) and {f: sorted(t) for f, t in w1.items()} == \
            {f: sorted(t) for f, t in w2.items()}
        dw = max(float((w1[f][k] - w2[f][k]).abs().max()) for f in w1 for k in w1[f])
        moved = max(float((w1[f][k] - w0).abs().max()) for f in w1 for k in w1[f]
                    for w0 in [_version_files(one_store, 0).get(f, {}).get(k, w1[f][k])])
        assert dw <= 1e-5 and moved > 1e-3, (dw, moved)
    finally:
        ranked.close()
    # The two ranks' optimizer state, stored whole, resumes a one-rank learner.
    resumed = serve(build_handler("learner", one_job, two_store))
    for client in (one, resumed):
        head = {"weights_version": 1, "step": 2}
        call(client, {"op": "begin", "request_id": "b2", **head, "group_ids": ["p0"]})
        call(client, {"op": "add", "request_id": "a2", **head,
                      "group": group("p0", [0, 0, 1.0, 1.0])})
        status, body = call(client, {"op": "finish", "request_id": "f2", **head})
        assert status == 200 and body["weights_version"] == 2, body
    w1, w2 = _version_files(one_store, 2), _version_files(two_store, 2)
    assert max(float((w1[f][k] - w2[f][k]).abs().max()) for f in w1 for k in w1[f]) <= 1e-5
    # ... and a fresh two-rank instance resumes from the one-rank state (each rank its slice).
    ranked = build_handler("learner", two_job, two_store)
    try:
        for client in (one, serve(ranked)):
            head = {"weights_version": 2, "step": 3}
            call(client, {"op": "begin", "request_id": "b3", **head, "group_ids": ["p1"]})
            call(client, {"op": "add", "request_id": "a3", **head,
                          "group": group("p1", [1.0, 0.5, 0, 0])})
            status, body = call(client, {"op": "finish", "request_id": "f3", **head})
            assert status == 200 and body["weights_version"] == 3, body
    finally:
        ranked.close()
    w1, w2 = _version_files(one_store, 3), _version_files(two_store, 3)
    # Three steps of rounding differences (lr 3e-3, Adam); moments lost or sliced wrongly would
    # be off by about the learning rate.
    assert max(float((w1[f][k] - w2[f][k]).abs().max()) for f in w1 for k in w1[f]) <= 1e-4
    assert not torch.equal(w1["model.safetensors"]["transformer.wte.weight"],
                           _version_files(one_store, 2)["model.safetensors"]
                           ["transformer.wte.weight"])
