"""Bodies on the wire for both runtimes: JSON for control messages, the binary codec for
anything carrying arrays, and the frames of a streamed reply."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from rlhfless.api import codec
from rlhfless.api.wire import INSTANCE_HEADER
from rlhfless.runtime.base import InvocationError, Payload


def encode_body(payload: Payload) -> tuple[bytes, dict[str, str]]:
    """(body, headers): the codec when the payload holds arrays, JSON otherwise."""
    if codec.has_arrays(payload):
        return codec.encode(payload), {"content-type": codec.CONTENT_TYPE}
    return json.dumps(payload).encode(), {"content-type": codec.JSON_TYPE}


def decode_body(response: httpx.Response) -> Payload:
    kind = response.headers.get("content-type", "").split(";")[0].strip()
    if kind == codec.CONTENT_TYPE:
        return codec.decode(response.content)
    return response.json()


def error_of(response: httpx.Response) -> tuple[str, str | None]:
    """(message, code) of a refused request."""
    try:
        body = response.json()
    except ValueError:
        return response.text, None
    if not isinstance(body, dict):
        return response.text, None
    return str(body.get("error", response.text)), body.get("code")


def served_by(response: httpx.Response) -> str | None:
    return response.headers.get(INSTANCE_HEADER)


async def frames(response: httpx.Response) -> AsyncIterator[Any]:
    """Decoded frames of a streamed reply; raises codec.CodecError on a truncated stream
    (the caller turns transport errors and truncation into StreamBroken)."""
    reader = codec.FrameReader()
    async for chunk in response.aiter_bytes():
        for message in reader.feed(chunk):
            yield message
    if reader.pending:
        raise codec.CodecError(f"stream ended inside a frame ({reader.pending} bytes)")


async def post_control(client: httpx.AsyncClient, stage: str, url: str, who: str,
                       payload: Payload, headers: dict[str, str] | None = None) -> Payload:
    """POST `payload` to one instance's `/control` (`who` names it in errors); a transport
    failure or an error reply is an InvocationError."""
    body, body_headers = encode_body(payload)
    try:
        response = await client.post(f"{url}/control", content=body,
                                     headers={**body_headers, **(headers or {})})
    except httpx.TransportError as exc:
        raise InvocationError(stage, f"{who}: {type(exc).__name__}") from None
    if response.status_code >= 400:
        message, code = error_of(response)
        raise InvocationError(stage, message, response.status_code, code)
    return decode_body(response)
