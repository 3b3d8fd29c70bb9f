"""The store is append-only and verifiable: optimizer state in safetensors, nothing
unpickled, a corrupt latest version detected at resume."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch

from rlhfless.api.wire import GroupData, LearnerAdd, LearnerBegin, LearnerFinish, TrainResponse
from rlhfless.functions.app import FunctionError
from rlhfless.functions.learner import LearnerHandler
from rlhfless.store import (
    OPTIMIZER_PART,
    Checkpoint,
    CheckpointError,
    WeightStore,
    load_checkpoint,
    load_optimizer_state,
    recover,
    save_checkpoint,
)
from rlhfless.store.optimizer import flatten_state, unflatten_state

PACKAGE = Path(__file__).resolve().parents[1] / "rlhfless"


def test_optimizer_state_round_trips_through_tensors_and_json() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = opt.state_dict()
    tensors, tree = flatten_state(state)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    back = unflatten_state(tensors, tree)
    assert list(back["state"]) == list(state["state"])  # int parameter ids stay ints
    assert back["param_groups"][0]["betas"] == (0.8, 0.9)  # tuples stay tuples
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(back["state"][pid][key], value)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.01)
    fresh.load_state_dict(back)
    assert fresh.state_dict()["param_groups"] == state["param_groups"]
    with pytest.raises(TypeError, match="without pickling"):
        flatten_state({"scaler": object()})


def _learn(learner: LearnerHandler, step: int, version: int, new_version: int | None = None,
           sign: float = 1.0, finish_id: str | None = None) -> TrainResponse:
    """One learner step on one group (begin, add, finish), publishing `new_version`."""
    head = {"weights_version": version, "step": step}
    learner.handle(LearnerBegin(request_id=f"b{step}", group_ids=["g"], **head))
    learner.handle(LearnerAdd(request_id=f"a{step}", **head, group=GroupData(
        group_id="g", prompt_ids=[80, 81], responses=[[65, 66], [67], [68, 69, 70], [71]],
        rewards=[sign, 0.0, 0.0, sign])))
    reply = learner.handle(LearnerFinish(request_id=finish_id or f"f{step}",
                                         new_version=new_version, **head))
    assert isinstance(reply, TrainResponse)
    return reply


def _finish(learner: LearnerHandler, step: int, version: int, new_version: int | None = None,
            finish_id: str | None = None) -> TrainResponse:
    reply = learner.handle(LearnerFinish(request_id=finish_id or f"f{step}", step=step,
                                         weights_version=version, new_version=new_version))
    assert isinstance(reply, TrainResponse)
    return reply


class _Planted:
    """A pickle that, if ever unpickled, leaves a marker file behind."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # noqa: D105 - what an attacker's file does
        return (Path.write_text, (self.marker, "pwned"))


def test_a_planted_pickle_where_optimizer_state_used_to_live_is_never_executed(
        tiny_store, tmp_path: Path) -> None:
    job, store = tiny_store
    _learn(LearnerHandler(store, job.spec), 1, 0)
    assert store.versions() == [0, 1]
    assert OPTIMIZER_PART in store.parts(1)  # optimizer state lives inside the version
    assert not (store.root / "optim").exists()
    marker = tmp_path / "executed"
    (store.root / "optim").mkdir()
    for version in (0, 1, 2):
        payload = pickle.dumps({"state": _Planted(marker)})
        (store.root / "optim" / f"v{version}.pt").write_bytes(payload)
    # A fresh learner instance (scaled from zero) resumes from v1 and trains v2.
    reply = _learn(LearnerHandler(store, job.spec), 2, 1)
    assert reply.weights_version == 2
    assert load_optimizer_state(store, 2) is not None
    assert not marker.exists()
    # And a pickle swapped in for the optimizer part is caught by the manifest's sha256.
    (store.path(2) / f"{OPTIMIZER_PART}.safetensors").write_bytes(
        pickle.dumps(_Planted(marker)))
    with pytest.raises(FunctionError, match="unreadable"):
        _learn(LearnerHandler(store, job.spec), 3, 2)
    assert not marker.exists()


def test_nothing_in_the_package_unpickles() -> None:
    """No torch.load, pickle or weights_only=False anywhere in rlhfless/."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "load" and isinstance(
                    node.value, ast.Name) and node.value.id in ("torch", "pickle", "dill"):
                found.append(f"{path.name}:{node.lineno} {node.value.id}.load")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names):
                    found.append(f"{path.name}:{node.lineno} imports pickle")
    assert found == []


def test_a_version_is_never_rewritten_and_a_repeated_finish_is_answered(tiny_store) -> None:
    job, store = tiny_store
    learner = LearnerHandler(store, job.spec)
    first = _learn(learner, 1, 0)
    manifest = (store.path(1) / "manifest.json").read_text()
    meta = store.meta(1)
    assert (meta["step"], meta["trained_from"], meta["request_id"]) == (1, 0, "f1")
    assert meta["stats"] == first.stats
    # The same finish again (a retry after a lost reply, here on a fresh instance that never
    # saw the step): the manifest answers it; nothing is trained or written.
    again = _finish(LearnerHandler(store, job.spec), 1, 0)
    assert again.weights_version == 1 and again.stats == first.stats
    # Another step aiming at the same version is refused, on any instance.
    for other in (learner, LearnerHandler(store, job.spec)):
        with pytest.raises(FunctionError) as refused:
            _learn(other, 1, 0, sign=-1.0, finish_id="f1-other")
        assert refused.value.status == 409 and "never rewritten" in refused.value.message
    assert (store.path(1) / "manifest.json").read_text() == manifest
    # A redone step asks for the next free number instead.
    redo = _learn(learner, 1, 0, new_version=2, finish_id="f1-redo")
    assert redo.weights_version == 2 and store.versions() == [0, 1, 2]
    assert store.meta(2)["trained_from"] == 0 and store.next_version() == 3
    # new_version must be above the version trained from.
    with pytest.raises(ValueError, match="new_version must be above"):
        LearnerFinish(request_id="x", weights_version=2, step=3, new_version=2)


def test_a_redone_step_never_meets_its_orphan_in_a_learner_that_kept_it(tiny_store) -> None:
    """A step that published v1 and died before its checkpoint is redone as v2 on the same
    (still warm) learner: it trains from v0 again, not from the orphan in memory."""
    job, store = tiny_store
    learner = LearnerHandler(store, job.spec)
    orphan = _learn(learner, 1, 0)
    redo = _learn(learner, 1, 0, new_version=2, finish_id="f1-redo")
    assert (orphan.weights_version, redo.weights_version) == (1, 2)
    a, _ = store.load(1)
    b, _ = store.load(2)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same data, same start: the same update
    assert store.meta(2)["trained_from"] == 0


def test_next_version_skips_numbers_left_by_unfinished_writes(tmp_path: Path) -> None:
    store = WeightStore(tmp_path)
    assert store.next_version() == 0
    store.save(0, {"w": torch.zeros(2)})
    (tmp_path / "v4").mkdir()  # a version directory without a manifest is not a version...
    assert store.versions() == [0]
    assert store.next_version() == 5  # ...but its number is not reused


def _corrupt_run(tmp_path: Path, steps: int = 3) -> tuple[Path, WeightStore]:
    run_dir, store = tmp_path / "run", WeightStore(tmp_path / "run" / "store")
    for step in range(steps + 1):
        store.save(step, {"w": torch.full((4,), float(step))}, {})
        if step:
            save_checkpoint(run_dir, Checkpoint(step=step, weights_version=step))
    return run_dir, store


def test_resume_falls_back_to_the_newest_intact_version_and_says_so(tmp_path: Path) -> None:
    run_dir, store = _corrupt_run(tmp_path)
    assert recover(run_dir, store).notice is None  # all intact: resume where it stopped
    latest = store.path(3) / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:-7])  # truncated
    result = recover(run_dir, store, "job.yaml")
    assert result.checkpoint is not None and result.checkpoint.step == 2
    assert result.checkpoint.weights_version == 2
    assert str(latest) in result.notice and "Resuming from step 2" in result.notice
    assert "steps 3–3 run again" in result.notice
    assert load_checkpoint(run_dir).step == 2  # the fallback is the checkpoint now


def test_resume_without_an_intact_version_prints_the_command(tmp_path: Path) -> None:
    run_dir, store = _corrupt_run(tmp_path, steps=1)
    file = store.path(1) / "model.safetensors"
    file.write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as exc:
        recover(run_dir, store, "examples/tiny-grpo.yaml")
    message = str(exc.value)
    assert str(file) in message
    assert "rlhfless run examples/tiny-grpo.yaml --overwrite" in message
