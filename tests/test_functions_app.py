"""Stage functions over HTTP, in-process: validation, versions, idempotency, metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from starlette.testclient import TestClient

from rlhfless.api import codec
from rlhfless.api.wire import GROUPS_MISSING, INSTANCE_HEADER, STEP_NOT_OPEN
from rlhfless.functions.app import create_app
from rlhfless.functions.serve import build_handler
from rlhfless.model.tokenizer import load_tokenizer
from rlhfless.store import ShardStore

TOKEN = "test-token"


def _client(stage, job, store, **kw):
    app = create_app(build_handler(stage, job, store), token=TOKEN, **kw)
    return TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})


def _actor_request(tok, request_id="r1", version=0, **extra):
    prompt = tok.encode(tok.render_prompt("hi"))
    body = {"request_id": request_id, "weights_version": version, "max_new_tokens": 6,
            "temperature": 1.0, "seed": 3,
            "prompts": [{"key": "p0", "prompt_ids": prompt, "sample_indices": [0, 1, 2, 3]}]}
    body.update(extra)
    return body


def _frames(reply):
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == codec.FRAMES_TYPE
    reader = codec.FrameReader()
    frames = list(reader.feed(reply.content))
    assert reader.pending == 0
    return frames


def test_actor_streams_whole_groups_and_reports_metrics(tiny_store):
    job, store = tiny_store
    tok = load_tokenizer(store.base_dir / "tokenizer")
    client = _client("actor", job, store)
    reply = client.post("/invoke", json=_actor_request(tok))
    frames = _frames(reply)
    assert [f["type"] for f in frames] == ["hello", "samples", "end"]
    assert frames[0]["instance"] == reply.headers[INSTANCE_HEADER]
    samples = frames[1]["samples"]
    assert sorted(s["index"] for s in samples) == [0, 1, 2, 3]
    assert all(s["response"].dtype == np.int32 and s["logprobs"].dtype == np.float32
               for s in samples)
    assert all(s["response"].size == s["logprobs"].size for s in samples)
    assert all((s["logprobs"] <= 0).all() for s in samples)
    assert frames[-1]["stats"]["prefill_tokens_saved"] > 0
    health = client.get("/healthz").json()
    assert health["weights_version"] == 0 and health["ready"]
    metrics = client.get("/metrics").text
    assert 'rlhfless_function_requests_total{outcome="ok",stage="actor"} 1.0' in metrics


def test_binary_and_json_bodies_give_the_same_stream(tiny_store):
    job, store = tiny_store
    tok = load_tokenizer(store.base_dir / "tokenizer")
    client = _client("actor", job, store)
    as_json = _frames(client.post("/invoke", json=_actor_request(tok)))
    body = _actor_request(tok, request_id="r2")
    body["prompts"][0]["prompt_ids"] = np.asarray(body["prompts"][0]["prompt_ids"], np.int32)
    as_binary = _frames(client.post("/invoke", content=codec.encode(body),
                                    headers={"content-type": codec.CONTENT_TYPE}))
    for a, b in zip(as_json[1]["samples"], as_binary[1]["samples"], strict=True):
        assert a["response"].tolist() == b["response"].tolist()


def test_repeated_request_id_is_answered_from_cache(tiny_store):
    job, store = tiny_store
    tok = load_tokenizer(store.base_dir / "tokenizer")
    client = _client("actor", job, store)
    first = client.post("/invoke", json=_actor_request(tok)).content
    again = client.post("/invoke", json=_actor_request(tok)).content
    assert first == again
    assert 'outcome="cached",stage="actor"} 1.0' in client.get("/metrics").text
    other = client.post("/invoke", json=_actor_request(tok, seed=4))
    assert other.status_code == 409 and "reused" in other.json()["error"]


def test_control_of_a_stage_without_controls_is_a_404(tiny_store):
    job, store = tiny_store
    reply = _client("reward", job, store).post("/control", json={"request_id": "c"})
    assert reply.status_code == 404


def test_actor_control_with_nothing_running_is_refused_not_failed(tiny_store):
    job, store = tiny_store
    client = _client("actor", job, store)
    reply = client.post("/control", json={"op": "cut", "request_id": "c", "rollout_id": "r"})
    assert reply.status_code == 200 and reply.json()["accepted"] is False
    bad = client.post("/control", json={"op": "explode", "request_id": "c"})
    assert bad.status_code == 422


def test_unknown_weights_version_is_refused(tiny_store):
    job, store = tiny_store
    tok = load_tokenizer(store.base_dir / "tokenizer")
    reply = _client("actor", job, store).post("/invoke", json=_actor_request(tok, version=7))
    assert reply.status_code == 404
    assert "unknown weights version 7" in reply.json()["error"]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"not json", 400, "not JSON"),
        (json.dumps({"request_id": "x"}).encode(), 422, "weights_version"),
        (json.dumps({"request_id": "x", "weights_version": 0, "prompts": [],
                     "max_new_tokens": 4}).encode(), 422, "prompts"),
        (json.dumps({"request_id": "x", "weights_version": 0, "max_new_tokens": 4,
                     "prompts": [{"key": "a", "prompt_ids": [5], "sample_indices": [0],
                                  "prefixes": [[1], [2]]}]}).encode(), 422, "prefixes"),
    ],
)
def test_bad_payloads_get_clear_4xx(tiny_store, body, status, fragment):
    job, store = tiny_store
    reply = _client("actor", job, store).post(
        "/invoke", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status
    assert fragment in reply.json()["error"]


def test_request_body_is_bounded(tiny_store):
    job, store = tiny_store
    client = _client("reward", job, store, max_body_bytes=1000)
    items = [{"prompt": "p", "response": "5" * 50}] * 40
    reply = client.post("/invoke", json={"request_id": "big", "items": items})
    assert reply.status_code == 413


def test_reward_scores_text(tiny_store):
    job, store = tiny_store
    client = _client("reward", job, store)
    reply = client.post("/invoke", json={"request_id": "r", "items": [
        {"prompt": "p", "response": "5555"}, {"prompt": "p", "response": "5a5a"},
        {"prompt": "p", "response": "abcd"}]})
    assert reply.json()["rewards"] == [1.0, 0.5, 0.0]


def _group(gid, responses=((65, 66), (67,), (68, 69, 70), (71,)), rewards=(1.0, 0, 0, 1.0)):
    return {"group_id": gid, "prompt_ids": [80, 81], "responses": [list(r) for r in responses],
            "rewards": list(rewards)}


def _learner_call(client, body, binary=False):
    if binary:
        reply = client.post("/invoke", content=codec.encode(body),
                            headers={"content-type": codec.CONTENT_TYPE})
        if reply.status_code == 200:
            assert reply.headers["content-type"] == codec.CONTENT_TYPE
            return reply.status_code, codec.decode(reply.content)
        return reply.status_code, reply.json()
    reply = client.post("/invoke", json=body)
    return reply.status_code, reply.json()


def test_learner_begin_add_finish_publishes_the_next_version(tiny_store):
    job, store = tiny_store
    client = _client("learner", job, store)
    head = {"weights_version": 0, "step": 1}
    status, body = _learner_call(client, {"op": "add", "request_id": "a0", **head,
                                          "group": _group("p0")})
    assert status == 409 and body["code"] == STEP_NOT_OPEN and "begin it" in body["error"]
    status, body = _learner_call(client, {"op": "begin", "request_id": "b", **head,
                                          "group_ids": ["p0", "p1"]})
    assert status == 200 and body["groups_expected"] == 2
    status, body = _learner_call(client, {"op": "add", "request_id": "a1", **head,
                                          "group": _group("p0")}, binary=True)
    assert status == 200 and body["added"] and body["groups_in"] == 1
    status, body = _learner_call(client, {"op": "add", "request_id": "a1-again", **head,
                                          "group": _group("p0")})
    assert status == 200 and not body["added"] and body["groups_in"] == 1  # counted once
    status, body = _learner_call(client, {"op": "finish", "request_id": "f0", **head})
    assert status == 409 and body["code"] == GROUPS_MISSING and "p1" in body["error"]
    assert store.versions() == [0]  # nothing applied
    status, body = _learner_call(client, {"op": "add", "request_id": "a2", **head,
                                          "group": _group("p1", rewards=(0, 1, 1, 0))})
    status, body = _learner_call(client, {"op": "finish", "request_id": "f1", **head})
    assert status == 200, body
    assert body["weights_version"] == 1 and store.versions() == [0, 1]
    assert body["stats"]["num_minibatches"] == 1 and "kl" in body["stats"]  # klBeta 0.01
    status, again = _learner_call(client, {"op": "finish", "request_id": "f2", **head})
    assert status == 200 and again["weights_version"] == 1  # not stepped twice
    same = [k for k in body["stats"] if k != "function_s"]
    assert {k: again["stats"][k] for k in same} == {k: body["stats"][k] for k in same}
    assert store.meta(1)["step"] == 1


def test_learner_reads_a_group_from_a_shard_and_refuses_bad_input(tiny_store):
    job, store = tiny_store
    client = _client("learner", job, store)
    head = {"weights_version": 0, "step": 3}
    _learner_call(client, {"op": "begin", "request_id": "b", **head, "group_ids": ["p0"]})
    shard = ShardStore(store.root).put(3, "g00000", _group("p0"))
    status, body = _learner_call(client, {"op": "add", "request_id": "a", **head,
                                          "shard": shard})
    assert status == 200 and body["added"]
    status, body = _learner_call(client, {"op": "add", "request_id": "x", **head,
                                          "shard": "../../etc/passwd"})
    assert status == 404 and "malformed shard id" in body["error"]
    status, body = _learner_call(client, {"op": "add", "request_id": "y", **head,
                                          "group": _group("p9")})
    assert status == 409 and "not part of step 3" in body["error"]
    status, body = _learner_call(client, {"op": "add", "request_id": "z", **head,
                                          "group": _group("p0", responses=[[1]])})
    assert status == 422 and "rewards must have one value per response" in body["error"]
    status, body = _learner_call(client, {"op": "add", "request_id": "w", **head,
                                          "group": _group("p0"), "shard": shard})
    assert status == 422 and "exactly one of group or shard" in body["error"]


def test_request_longer_than_the_model_is_a_422(tiny_store):
    job, store = tiny_store
    tok = load_tokenizer(store.base_dir / "tokenizer")
    body = _actor_request(tok, max_new_tokens=500)  # the tiny model has 96 positions
    reply = _client("actor", job, store).post("/invoke", json=body)
    assert reply.status_code == 422
    assert "cannot serve this request" in reply.json()["error"]
