"""A pool of long-lived helper processes answering one JSON line per request, with a deadline.

Work that can hang (a symbolic comparison that never finishes) cannot be interrupted inside a
thread, and signal-based timeouts only work in a main thread; a process can always be killed.
Each caller borrows a worker for one request; a worker that misses its deadline, dies or
answers garbage is killed and replaced by a fresh one on the next request, so the pool never
hands out a stuck process. Workers exit by themselves when their stdin closes (their parent
died), so they never outlive the function.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import select
import subprocess
import threading
import time
from typing import Any

log = logging.getLogger("rlhfless.rewards")


# A worker's imports (sympy, ...) are not part of any request's deadline.
READY_TIMEOUT_S = 120.0


class WorkerStartError(RuntimeError):
    """A helper process that did not start (its program failed before saying it is ready)."""


class _Worker:
    def __init__(self, argv: list[str], env: dict[str, str] | None):
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, start_new_session=True, close_fds=True,
        )
        self._buffer = b""
        if self._read_reply(READY_TIMEOUT_S) != {"ready": True}:
            self.kill()
            raise WorkerStartError(f"{' '.join(argv)} did not start")

    def ask(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """The reply, or None when the worker missed the deadline or failed."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        return self._read_reply(timeout_s)

    def _read_reply(self, timeout_s: float) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None  # the worker died
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except json.JSONDecodeError:
            return None
        return reply if isinstance(reply, dict) else None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, 9)
        with contextlib.suppress(OSError):
            self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()


class WorkerPool:
    """Borrow-a-worker pool; grows to as many workers as requests run at once."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None):
        self.argv = argv
        self.env = env
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self.restarts = 0
        atexit.register(self.close)

    def call(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """Send `request` to an idle worker; None if it timed out or failed (worker replaced)."""
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = _Worker(self.argv, self.env)
            with self._lock:
                self._all.add(worker)
        reply = worker.ask(request, timeout_s)
        if reply is None:
            worker.kill()
            with self._lock:
                self._all.discard(worker)
                self.restarts += 1
            log.warning("reward worker %s gave no answer within %.1f s; replaced",
                        self.argv[-1], timeout_s)
            return None
        with self._lock:
            self._idle.append(worker)
        return reply

    def prestart(self, n: int = 1) -> None:
        """Start workers ahead of the first request (their imports are part of a cold start)."""
        while self.size() < n:
            worker = _Worker(self.argv, self.env)
            with self._lock:
                self._all.add(worker)
                self._idle.append(worker)

    def size(self) -> int:
        with self._lock:
            return len(self._all)

    def close(self) -> None:
        with self._lock:
            workers, self._all, self._idle = list(self._all), set(), []
        for worker in workers:
            worker.kill()
