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
