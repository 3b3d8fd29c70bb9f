"""Bearer-token authentication for every stage-function endpoint but the probes.

A job's functions and its driver share one random token (the job's Secret on a cluster, a
per-run token in the local runtime). `BearerAuth` is ASGI middleware: a request to any path
outside `PUBLIC_PATHS` without `Authorization: Bearer <token>` gets 401 before a handler
runs, so an endpoint added later is protected without doing anything. The comparison is
constant-time.
"""

from __future__ import annotations

import hmac
import json
import os
from typing import Any

from rlhfless.api.wire import TOKEN_ENV

# Readiness probes and Prometheus scrapes carry no token; they reveal no job data.
PUBLIC_PATHS = frozenset({"/healthz", "/metrics"})


class TokenMissing(RuntimeError):
    pass


def token_from_env(env: Any = os.environ) -> str:
    token = (env.get(TOKEN_ENV) or "").strip()
    if not token:
        raise TokenMissing(f"no function token: set {TOKEN_ENV} (on a cluster the operator "
                           "mounts it from the job's Secret)")
    return token


def bearer_ok(header: str | None, token: str) -> bool:
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


class BearerAuth:
    """ASGI middleware: 401 (JSON) for an HTTP request without the job's token."""

    def __init__(self, app: Any, token: str):
        if not token:
            raise TokenMissing("an empty token would let anyone in")
        self.app = app
        self.token = token

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        header = headers.get(b"authorization", b"").decode("latin-1")
        if bearer_ok(header, self.token):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": "missing or wrong bearer token"}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="rlhfless"'),
        ]})
        await send({"type": "http.response.body", "body": body})
