"""The functions' HTTP surface as an untrusted caller meets it: a token, bounded bodies,
abandoned requests freed, bad token ids and non-finite numbers refused, no paths leaked."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import BaseModel
from starlette.testclient import TestClient

from rlhfless.api import codec
from rlhfless.api.wire import ActorRequest, ControlReply, EndFrame, HelloFrame
from rlhfless.functions import cancel
from rlhfless.functions.app import create_app, redact_paths
from rlhfless.functions.serve import build_handler
from rlhfless.model.generation import generate
from rlhfless.model.materialize import load_from_store

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ACTOR_BODY = {"request_id": "a1", "weights_version": 0, "max_new_tokens": 4,
              "prompts": [{"key": "p", "prompt_ids": [70, 71], "sample_indices": [0]}]}


def _client(stage: str, job: Any, store: Any, **kw: Any) -> TestClient:
    return TestClient(create_app(build_handler(stage, job, store), token=TOKEN, **kw))


class _Reply(BaseModel):
    samples: list[Any] = []
    stats: dict[str, float] = {}


class SlowActor:
    """Generates 'forever' (checking for cancellation like the engines do)."""

    stage = "actor"

    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.calls = 0

    def loaded_version(self) -> int | None:
        return 0

    def handle(self, request: ActorRequest) -> _Reply:
        self.calls += 1
        if request.request_id.startswith("quick"):
            return _Reply(stats={"x": 1.0})
        self.started.set()
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                cancel.check()
                time.sleep(0.01)
        except cancel.RequestCancelled:
            self.cancelled.set()
            raise
        return _Reply()


class SlowStreamingActor(SlowActor):
    """A streaming actor (as the real one): says hello, then generates 'forever'."""

    def stream(self, request: ActorRequest, emit: Any) -> None:
        emit(HelloFrame(instance="slow"))
        self.handle(request)
        emit(EndFrame(stats={}))

    def control(self, request: Any) -> BaseModel:
        return ControlReply(accepted=False)


class NaNActor(SlowActor):
    def handle(self, request: ActorRequest) -> _Reply:
        return _Reply(stats={"loss": float("nan")})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serving(app: Any) -> Iterator[int]:
    """The app on a real uvicorn server (loopback), as a function instance runs it."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


# -- authentication --------------------------------------------------------------------------

def test_invoke_needs_the_bearer_token(tiny_store) -> None:
    job, store = tiny_store
    client = _client("reward", job, store)
    body = {"request_id": "r", "items": [{"prompt": "p", "response": "5"}]}
    assert client.post("/invoke", json=body).status_code == 401
    for header in ("Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer", TOKEN):
        reply = client.post("/invoke", json=body, headers={"Authorization": header})
        assert reply.status_code == 401, header
        assert reply.json() == {"error": "missing or wrong bearer token"}
    # Any other path is closed by default, not only the ones known today.
    assert client.post("/admin/reload", headers={}).status_code == 401
    assert client.post("/invoke", json=body, headers=AUTH).status_code == 200
    # Probes stay open: they reveal readiness, never job data.
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_an_app_cannot_be_built_without_a_token(tiny_store) -> None:
    job, store = tiny_store
    with pytest.raises(RuntimeError, match="empty token"):
        create_app(build_handler("reward", job, store), token="")


def test_serve_refuses_to_start_without_a_token(tmp_path, monkeypatch) -> None:
    from rlhfless.functions.serve import main

    monkeypatch.delenv("RLHFLESS_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["--stage", "reward", "--store", str(tmp_path), "--port", "0"])
    assert exc.value.code == 2


# -- bodies ----------------------------------------------------------------------------------

def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(tiny_store) -> None:
    job, store = tiny_store
    app = create_app(build_handler("reward", job, store), token=TOKEN, max_body_bytes=1000)
    with serving(app) as port, socket.create_connection(("127.0.0.1", port), 10) as sock:
        sock.sendall(b"POST /invoke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                     TOKEN.encode() + b"\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 400
        for _ in range(4):  # 1,600 bytes: past the limit, and the body never ends
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        sock.settimeout(20)  # a server waiting for the whole body would never answer
        reply = b""
        while b"over 1000 bytes" not in reply and (data := sock.recv(4096)):
            reply += data
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"over 1000 bytes" in reply


def test_nan_in_a_request_body_is_not_json(tiny_store) -> None:
    job, store = tiny_store
    client = _client("reward", job, store)
    for constant in ("NaN", "Infinity", "-Infinity"):
        body = ('{"request_id": "r", "items": [{"prompt": "p", "response": "5", '
                f'"meta": {{"x": {constant}}}}}]}}')
        reply = client.post("/invoke", content=body, headers=AUTH)
        assert reply.status_code == 400 and "not JSON" in reply.json()["error"]


# -- abandoned requests ----------------------------------------------------------------------

def test_a_client_that_disconnects_cancels_its_generation() -> None:
    actor = SlowActor()
    app = create_app(actor, token=TOKEN)
    with serving(app) as port:
        url = f"http://127.0.0.1:{port}/invoke"
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=ACTOR_BODY, headers=AUTH, timeout=httpx.Timeout(
                1.0, connect=10.0))
        assert actor.started.is_set()
        assert actor.cancelled.wait(20), "the abandoned generation kept running"
        # The instance is free again at once (it serves one request at a time).
        started = time.monotonic()
        reply = httpx.post(url, json={**ACTOR_BODY, "request_id": "quick"}, headers=AUTH,
                           timeout=20)
        assert reply.status_code == 200 and time.monotonic() - started < 10
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'outcome="cancelled",stage="actor"} 1.0' in metrics


def test_a_request_whose_caller_left_while_it_queued_is_not_served() -> None:
    actor = SlowActor()
    app = create_app(actor, token=TOKEN)
    body = json.dumps(ACTOR_BODY).encode()
    with serving(app) as port:
        # Caller A holds the instance (one request at a time)...
        a = socket.create_connection(("127.0.0.1", port), 10)
        a.sendall(b"POST /invoke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                  TOKEN.encode() + b"\r\nContent-Type: application/json\r\n" +
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert actor.started.wait(20)
        # ...caller B queues behind it and gives up...
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"http://127.0.0.1:{port}/invoke", headers=AUTH,
                       json={**ACTOR_BODY, "request_id": "b"},
                       timeout=httpx.Timeout(1.0, connect=10.0))
        a.close()  # ...then A goes too: B's request comes up, and is dropped unserved.
        assert actor.cancelled.wait(20)
        deadline = time.monotonic() + 20
        while 'outcome="cancelled",stage="actor"} 2.0' not in httpx.get(
                f"http://127.0.0.1:{port}/metrics").text:
            assert time.monotonic() < deadline, "B was never dropped"
            time.sleep(0.05)
    assert actor.calls == 1


def test_generation_stops_at_the_next_decode_step_when_cancelled(tiny_store) -> None:
    _, store = tiny_store
    model, tok = load_from_store(store, 0)
    steps: list[int] = []

    def on_step() -> None:
        steps.append(1)
        if len(steps) == 3:
            raise cancel.RequestCancelled("gone")

    with pytest.raises(cancel.RequestCancelled):
        generate(model, tok, [[70, 71]], n=2, max_new_tokens=40, on_step=on_step)
    assert len(steps) == 3
    # The actor function wires it up: a cancelled request's generation raises.
    handler = build_handler("actor", *tiny_store)
    event = threading.Event()
    event.set()
    frames: list[BaseModel] = []
    with cancel.cancellable(event), pytest.raises(cancel.RequestCancelled):
        handler.stream(ActorRequest(**{**ACTOR_BODY, "max_new_tokens": 40}), frames.append)
    assert [type(f).__name__ for f in frames] == ["HelloFrame"]  # nothing generated after


def test_a_caller_that_leaves_a_stream_stops_the_rollout() -> None:
    """The streaming actor: the caller reads the first frame and goes away; the rollout
    stops at its next check (the same cancel as a plain request's), and the instance is
    free for the next caller."""
    actor = SlowStreamingActor()
    app = create_app(actor, token=TOKEN)
    with serving(app) as port:
        url = f"http://127.0.0.1:{port}/invoke"
        with httpx.stream("POST", url, json=ACTOR_BODY, headers=AUTH, timeout=20) as reply:
            assert reply.status_code == 200
            first = next(codec.FrameReader().feed(next(reply.iter_bytes())))
            assert first["type"] == "hello"
        assert actor.cancelled.wait(20), "the abandoned rollout kept running"
        reply = httpx.post(url, json={**ACTOR_BODY, "request_id": "quick"}, headers=AUTH,
                           timeout=20)
        assert reply.status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'outcome="cancelled",stage="actor"} 1.0' in metrics


# -- token ids, non-finite numbers, paths ----------------------------------------------------

GROUP = {"group_id": "g", "prompt_ids": [80, 81], "responses": [[65, 66], [67], [68], [69]],
         "rewards": [1.0, 0.0, 0.0, 1.0]}
LEARNER_HEAD = {"weights_version": 0, "step": 1}


def _begin(client: TestClient, request_id: str = "b") -> None:
    reply = client.post("/invoke", headers=AUTH, json={
        "op": "begin", "request_id": request_id, "group_ids": ["g"], **LEARNER_HEAD})
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("stage,body,where", [
    ("actor", {**ACTOR_BODY, "prompts": [{"key": "p", "prompt_ids": [70, 128],
                                           "sample_indices": [0]}]},
     "prompts[0].prompt_ids[1]: token id 128"),
    ("actor", {**ACTOR_BODY, "prompts": [{"key": "p", "prompt_ids": [70], "sample_indices": [0],
                                           "prefixes": [[5, -1]]}]},
     "prompts[0].prefixes[0][1]: token id -1"),
    ("learner", {"op": "add", "request_id": "a", **LEARNER_HEAD,
                 "group": {**GROUP, "responses": [[65], [66, 9999], [67], [68]]}},
     "group.responses[1][1]: token id 9999"),
    ("learner", {"op": "add", "request_id": "a", **LEARNER_HEAD,
                 "group": {**GROUP, "prompt_ids": [80, 500]}},
     "group.prompt_ids[1]: token id 500"),
])
def test_out_of_vocabulary_token_ids_are_a_422(tiny_store, stage: str, body: dict,
                                               where: str) -> None:
    job, store = tiny_store
    client = _client(stage, job, store)
    if stage == "learner":
        _begin(client)
    reply = client.post("/invoke", json=body, headers=AUTH)
    assert reply.status_code == 422, reply.text
    assert where in reply.json()["error"] and "[0, 128)" in reply.json()["error"]


def test_out_of_vocabulary_ids_in_a_hand_off_are_refused(tiny_store) -> None:
    """The streaming actor's control endpoint: a merge carrying a bad token id is a 422,
    and the endpoint, like every other, needs the token."""
    job, store = tiny_store
    client = _client("actor", job, store)
    merge = {"op": "merge", "request_id": "m", "weights_version": 0, "max_new_tokens": 4,
             "prompts": [{"key": "p", "prompt_ids": [70], "sample_indices": [1],
                          "prefixes": [[5, 200]]}]}
    assert client.post("/control", json=merge).status_code == 401
    cut = {"op": "cut", "request_id": "c", "rollout_id": "r"}
    assert client.post("/control", json=cut, headers={"Authorization": "Bearer x"}
                       ).status_code == 401
    assert client.post("/control", json=cut, headers=AUTH).json()["accepted"] is False
    refused = client.post("/control", json=merge, headers=AUTH)
    assert refused.status_code == 422
    assert "prompts[0].prefixes[0][1]: token id 200" in refused.json()["error"]


def test_non_finite_training_statistics_publish_nothing(tiny_store) -> None:
    job, store = tiny_store
    client = _client("learner", job, store)
    _begin(client)
    huge = {**GROUP, "rewards": [1e308, -1e308, 1e308, -1e308]}
    reply = client.post("/invoke", headers=AUTH, json={
        "op": "add", "request_id": "a", **LEARNER_HEAD, "group": huge})
    assert reply.status_code == 200, reply.text
    reply = client.post("/invoke", headers=AUTH, json={
        "op": "finish", "request_id": "f", **LEARNER_HEAD})
    assert reply.status_code == 422, reply.text
    assert "non-finite" in reply.json()["error"] and "not published" in reply.json()["error"]
    assert store.versions() == [0]
    # The instance recovers: the step begun again with sane rewards trains from the store.
    _begin(client, "b2")
    reply = client.post("/invoke", headers=AUTH, json={
        "op": "add", "request_id": "a2", **LEARNER_HEAD, "group": GROUP})
    assert reply.status_code == 200, reply.text
    reply = client.post("/invoke", headers=AUTH, json={
        "op": "finish", "request_id": "f2", **LEARNER_HEAD})
    assert reply.status_code == 200 and store.versions() == [0, 1]


def test_nan_in_a_binary_body_is_refused(tiny_store) -> None:
    job, store = tiny_store
    client = _client("learner", job, store)
    _begin(client)
    body = {"op": "add", "request_id": "a", **LEARNER_HEAD,
            "group": {**GROUP, "rewards": [1.0, float("nan"), 0.0, 1.0]}}
    reply = client.post("/invoke", content=codec.encode(body),
                        headers={**AUTH, "content-type": codec.CONTENT_TYPE})
    assert reply.status_code == 400
    assert "group.rewards[1] is not a finite number" in reply.json()["error"]


def test_a_non_finite_reply_is_still_a_json_error() -> None:
    client = TestClient(create_app(NaNActor(), token=TOKEN))
    reply = client.post("/invoke", json=ACTOR_BODY, headers=AUTH)
    assert reply.status_code == 500
    assert "non-finite" in reply.json()["error"]


def test_error_replies_name_no_filesystem_path(tiny_store, tmp_path) -> None:
    job, store = tiny_store
    weights = store.path(0) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-5])  # corrupt: the load fails, naming the file
    reply = _client("actor", job, store).post("/invoke", json=ACTOR_BODY, headers=AUTH)
    assert reply.status_code == 409
    text = reply.json()["error"]
    assert "model.safetensors" in text and "corrupt" in text
    assert str(tmp_path) not in text and "/store/" not in text


def test_redact_paths_keeps_only_the_last_component() -> None:
    assert redact_paths("cannot read /data/jobs/ns/x-1/store/v3/model.safetensors: EOF") == \
        "cannot read model.safetensors: EOF"
    assert redact_paths("weights store '/tmp/a/b' empty") == "weights store 'b' empty"
    assert redact_paths("ratio 1/2 and a/b stay") == "ratio 1/2 and a/b stay"
