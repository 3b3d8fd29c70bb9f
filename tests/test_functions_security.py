"""The functions' HTTP surface as an untrusted caller meets it: a token, bounded bodies,
abandoned requests freed, bad token ids and non-finite numbers refused, no paths leaked."""

from __future__ import annotations

import contextlib
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

from rlhfless.api.wire import ActorRequest
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
    with cancel.cancellable(event), pytest.raises(cancel.RequestCancelled):
        handler.handle(ActorRequest(**ACTOR_BODY))


# -- token ids, non-finite numbers, paths ----------------------------------------------------

@pytest.mark.parametrize("stage,body,where", [
    ("actor", {**ACTOR_BODY, "prompts": [{"key": "p", "prompt_ids": [70, 128],
                                           "sample_indices": [0]}]},
     "prompts[0].prompt_ids[1]: token id 128"),
    ("actor", {**ACTOR_BODY, "prompts": [{"key": "p", "prompt_ids": [70], "sample_indices": [0],
                                           "prefixes": [[5, -1]]}]},
     "prompts[0].prefixes[0][1]: token id -1"),
    ("reference", {"request_id": "s", "weights_version": 0, "prompts": [[80]],
                   "groups": [[[65], [66, 9999]]]}, "groups[0][1][1]: token id 9999"),
    ("trainer", {"request_id": "t", "weights_version": 0, "prompts": [[80, 500]],
                 "groups": [[[65]]], "advantages": [[[1.0]]], "ref_logprobs": [[[-1.0]]]},
     "prompts[0][1]: token id 500"),
])
def test_out_of_vocabulary_token_ids_are_a_422(tiny_store, stage: str, body: dict,
                                               where: str) -> None:
    job, store = tiny_store
    reply = _client(stage, job, store).post("/invoke", json=body, headers=AUTH)
    assert reply.status_code == 422, reply.text
    assert where in reply.json()["error"] and "[0, 128)" in reply.json()["error"]


def test_non_finite_training_statistics_publish_nothing(tiny_store) -> None:
    job, store = tiny_store
    client = _client("trainer", job, store)
    body = {"request_id": "t", "weights_version": 0, "prompts": [[80, 81]],
            "groups": [[[65, 66], [67]]], "advantages": [[[1e308, 1e308], [-1e308]]],
            "ref_logprobs": [[[-4.0, -4.0], [-4.0]]]}
    reply = client.post("/invoke", json=body, headers=AUTH)
    assert reply.status_code == 422, reply.text
    assert "non-finite" in reply.json()["error"] and "not published" in reply.json()["error"]
    assert store.versions() == [0]
    # The instance recovers: a sane request afterwards trains from the stored version.
    sane = {**body, "request_id": "t2", "advantages": [[[1.0, 1.0], [-1.0]]]}
    reply = client.post("/invoke", json=sane, headers=AUTH)
    assert reply.status_code == 200 and store.versions() == [0, 1]


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
