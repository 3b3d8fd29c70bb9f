"""Stage functions over HTTP, in-process: validation, versions, idempotency, metrics."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from rlhfless.functions.app import create_app
from rlhfless.functions.serve import build_handler
from rlhfless.model.tokenizer import load_tokenizer

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


def test_actor_generates_whole_group_and_reports_metrics(tiny_store):
    job, store = tiny_store
    tok = load_tokenizer(store.base_dir / "tokenizer")
    client = _client("actor", job, store)
    reply = client.post("/invoke", json=_actor_request(tok))
    assert reply.status_code == 200, reply.text
    samples = reply.json()["samples"]
    assert sorted(s["index"] for s in samples) == [0, 1, 2, 3]
    assert all(len(s["response"]) == len(s["logprobs"]) for s in samples)
    assert all(lp <= 0 for s in samples for lp in s["logprobs"])
    assert reply.json()["stats"]["prefill_tokens_saved"] > 0
    health = client.get("/healthz").json()
    assert health["weights_version"] == 0 and health["ready"]
    metrics = client.get("/metrics").text
    assert 'rlhfless_function_requests_total{outcome="ok",stage="actor"} 1.0' in metrics


def test_repeated_request_id_is_answered_from_cache(tiny_store):
    job, store = tiny_store
    tok = load_tokenizer(store.base_dir / "tokenizer")
    client = _client("actor", job, store)
    first = client.post("/invoke", json=_actor_request(tok)).json()
    again = client.post("/invoke", json=_actor_request(tok)).json()
    assert first == again
    assert 'outcome="cached",stage="actor"} 1.0' in client.get("/metrics").text
    other = client.post("/invoke", json=_actor_request(tok, seed=4))
    assert other.status_code == 409 and "reused" in other.json()["error"]


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


def test_reference_shared_prefix_equals_naive(tiny_store):
    job, store = tiny_store
    client = _client("reference", job, store)
    groups = [[[65, 66, 67], [68], [69, 70]], [[71, 72]]]
    body = {"request_id": "a", "weights_version": 0, "prompts": [[80, 81, 82], [83]],
            "groups": groups}
    shared = client.post("/invoke", json=body).json()
    naive = client.post("/invoke", json={**body, "request_id": "b",
                                         "dedup_prefill": False}).json()
    assert shared["stats"]["prefill_tokens_saved"] == 3 * 2
    for g_shared, g_naive in zip(shared["values"], naive["values"], strict=True):
        for a, b in zip(g_shared, g_naive, strict=True):
            assert len(a) == len(b)
            assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4


def test_trainer_publishes_next_version_and_refuses_unknown(tiny_store):
    job, store = tiny_store
    client = _client("trainer", job, store)
    body = {"request_id": "t1", "weights_version": 0, "prompts": [[80, 81]],
            "groups": [[[65, 66], [67]]], "advantages": [[[1.0, 1.0], [-1.0]]]}
    no_ref = client.post("/invoke", json=body)
    assert no_ref.status_code == 422 and "ref_logprobs" in no_ref.json()["error"]
    body = {**body, "request_id": "t1b", "ref_logprobs": [[[-4.0, -4.0], [-4.0]]]}
    reply = client.post("/invoke", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["weights_version"] == 1
    assert store.versions() == [0, 1]
    bad = client.post("/invoke", json={**body, "request_id": "t2",
                                       "advantages": [[[1.0], [-1.0]]]})
    assert bad.status_code == 422 and "response lengths" in bad.json()["error"]


def test_request_longer_than_the_model_is_a_422(tiny_store):
    job, store = tiny_store
    tok = load_tokenizer(store.base_dir / "tokenizer")
    body = _actor_request(tok, max_new_tokens=500)  # the tiny model has 96 positions
    reply = _client("actor", job, store).post("/invoke", json=body)
    assert reply.status_code == 422
    assert "cannot serve this request" in reply.json()["error"]
