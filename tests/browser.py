"""A headless Chromium driven over the DevTools protocol, for tests of HTML pages.

Chromium comes from Debian (`apt-get install --no-install-recommends chromium`, as .ci/run
does); the DevTools websocket is spoken with `websocket-client`. Tests that need a browser
call `chromium_or_skip()`, which skips with the reason when either is missing.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
START_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 60.0


def chromium_or_skip() -> str:
    """The Chromium binary ($RLHFLESS_CHROMIUM or on PATH), or skip the calling test."""
    pytest.importorskip("websocket", reason="websocket-client is not installed (dev extra)")
    explicit = os.environ.get("RLHFLESS_CHROMIUM")
    for name in ((explicit,) if explicit else CANDIDATES):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on this machine: install Debian's chromium "
                "(apt-get install --no-install-recommends chromium; .ci/run does)")


@dataclass
class PageLog:
    """What the page did while loading: console messages, exceptions, network requests."""

    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


class Page:
    """One tab: navigate, evaluate JavaScript, screenshot; records PageLog from events."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=CALL_TIMEOUT_S,
                                              suppress_origin=True)
        self.log = PageLog()
        self._ids = itertools.count(1)
        self._events: list[dict[str, Any]] = []

    def close(self) -> None:
        self.ws.close()

    def _record(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.log.console_errors.append(json.dumps(params.get("args")))
        elif method == "Runtime.exceptionThrown":
            self.log.exceptions.append(json.dumps(params.get("exceptionDetails")))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.log.console_errors.append(params["entry"].get("text", ""))
        elif method == "Network.requestWillBeSent":
            self.log.requests.append(params["request"]["url"])
        self._events.append(message)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._record(message)
        raise TimeoutError(f"{method}: no answer in {CALL_TIMEOUT_S} s")

    def wait_event(self, method: str) -> dict[str, Any]:
        for seen in self._events:
            if seen.get("method") == method:
                return seen
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            self._record(message)
            if message.get("method") == method:
                return message
        raise TimeoutError(f"no {method} in {CALL_TIMEOUT_S} s")

    def open(self, url: str) -> None:
        """Navigate and wait for the load event, with console, errors and network logged."""
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.call(f"{domain}.enable")
        self._events.clear()
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path, width: int = 1200) -> Path:
        """The whole page (not only the viewport) as a PNG."""
        height = int(self.evaluate("document.documentElement.scrollHeight"))
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path


@contextmanager
def chromium_page(binary: str) -> Iterator[Page]:
    """A fresh headless Chromium (own profile, no network use of its own) and one tab."""
    profile = tempfile.mkdtemp(prefix="rlhfless-chromium-")
    stderr = (Path(profile) / "stderr.log").open("w")  # a pipe nobody reads could fill up
    proc = subprocess.Popen(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-sync",
         "--disable-background-networking", "--disable-component-update",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "--window-size=1200,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    page: Page | None = None
    try:
        port = _devtools_port(proc, profile)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                break
            assert time.monotonic() < deadline, "Chromium opened no page"
            time.sleep(0.2)
        page = Page(pages[0]["webSocketDebuggerUrl"])
        yield page
    finally:
        if page is not None:
            page.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stderr.close()
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_port(proc: subprocess.Popen[str], profile: str) -> int:
    """Chromium writes the port it chose to <profile>/DevToolsActivePort (and to stderr)."""
    marker = Path(profile) / "DevToolsActivePort"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = (Path(profile) / "stderr.log").read_text(errors="replace")
            raise RuntimeError(f"Chromium exited with {proc.returncode}: {err[-2000:]}")
        if marker.exists():
            first = marker.read_text().splitlines()[:1]
            if first and re.fullmatch(r"\d+", first[0]):
                return int(first[0])
        time.sleep(0.1)
    raise TimeoutError(f"Chromium did not open its DevTools port in {START_TIMEOUT_S} s")
