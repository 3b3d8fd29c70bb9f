"""Abandoning a request whose caller went away.

The HTTP app runs each request in a worker thread with a cancel event; when the client
disconnects it sets the event, and the engine's loop (between decode steps) calls `check()`,
which raises `RequestCancelled`. An abandoned request therefore frees the instance within a
decode step instead of generating to the end for nobody.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar

_current: ContextVar[threading.Event | None] = ContextVar("rlhfless_cancel", default=None)


class RequestCancelled(Exception):
    """The caller disconnected; the work was abandoned and nothing is returned or cached."""


@contextlib.contextmanager
def cancellable(event: threading.Event) -> Iterator[None]:
    """Run the enclosed (blocking) work under `event`."""
    token = _current.set(event)
    try:
        yield
    finally:
        _current.reset(token)


def check() -> None:
    """Raise RequestCancelled if the current request's caller went away."""
    event = _current.get()
    if event is not None and event.is_set():
        raise RequestCancelled("the caller disconnected")
