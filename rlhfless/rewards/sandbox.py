"""Run an untrusted Python program once, in a sandbox, and collect what it printed.

Layers (each one holds on its own where the others are missing):
- its own process group (session), killed as a whole on timeout and after every run;
- no network: a new network namespace (`unshare --user --net`) where the kernel allows it,
  and in any case the guard in `_sandbox_child.py`, which refuses sockets by default;
- limits set in the child before the program starts: CPU seconds, address space, size of
  files written, open files, processes (RLIMIT_NPROC counts per user, so it only binds a
  non-root function; root is exempt from it);
- wall time and output size enforced here: a program past either is killed;
- a private temporary directory as its cwd, HOME and TMPDIR, removed afterwards;
- a scrubbed environment: the function's variables (its token, the job spec) never reach it;
- `python -I -S -B`: no user site, no site-packages, no bytecode written.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("rlhfless.rewards")
CHILD = Path(__file__).with_name("_sandbox_child.py")
UNSHARE = ["unshare", "--user", "--map-root-user", "--net"]
STDERR_KEPT = 4096
NPROC_HEADROOM = 16  # threads a program may start (each counts against RLIMIT_NPROC)


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0  # wall time; CPU time is capped at the same number of seconds
    memory_mb: int = 512  # address space
    max_output_bytes: int = 1 << 20  # stdout (and stderr, separately)
    max_file_bytes: int = 16 << 20  # any file the program writes

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_mb < 32:
            raise ValueError(f"memory_mb must be >= 32, got {self.memory_mb}")
        if self.max_output_bytes < 1 or self.max_file_bytes < 0:
            raise ValueError("output and file size limits must be positive")


@dataclass(frozen=True)
class RunResult:
    stdout: bytes
    stderr_tail: str
    returncode: int | None
    timed_out: bool = False
    output_exceeded: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_exceeded


@functools.cache
def network_namespace_prefix() -> tuple[str, ...]:
    """`unshare` arguments that give a child no network, or () where that is not allowed
    (then only the in-process socket guard stands)."""
    if shutil.which("unshare") is None:
        log.warning("no unshare binary: sandboxed programs rely on the socket guard alone")
        return ()
    try:
        probe = subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        probe = None
    if probe is None or probe.returncode != 0:
        log.warning("network namespaces are not available here: sandboxed programs rely on "
                    "the socket guard alone")
        return ()
    return tuple(UNSHARE)


def _scrubbed_env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home,
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _user_tasks(uid: int) -> int:
    """Processes and threads of `uid` on this machine (what RLIMIT_NPROC counts)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            status = Path(entry.path, "status").read_text()
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields.get("Threads", "1"))
    return total


def _nproc_limit() -> int | None:
    uid = os.getuid()
    return None if uid == 0 else _user_tasks(uid) + NPROC_HEADROOM


def run_python(source: str, stdin: str, limits: SandboxLimits) -> RunResult:
    """Run `source` as a program fed `stdin`; never raises for anything the program does."""
    workdir = tempfile.mkdtemp(prefix="rlhfless-sandbox-")
    try:
        Path(workdir, "solution.py").write_text(source, encoding="utf-8")
        config = {
            "memory_bytes": limits.memory_mb << 20,
            "cpu_s": max(1, math.ceil(limits.timeout_s)),
            "file_bytes": limits.max_file_bytes,
            "nproc": _nproc_limit(),
        }
        argv = [*network_namespace_prefix(), sys.executable, "-I", "-S", "-B", str(CHILD),
                json.dumps(config)]
        proc = subprocess.Popen(
            argv, cwd=workdir, env=_scrubbed_env(workdir), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            close_fds=True,
        )
        try:
            return _communicate(proc, stdin.encode("utf-8", "replace"), limits)
        finally:
            _kill_group(proc)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _communicate(proc: subprocess.Popen[bytes], data: bytes, limits: SandboxLimits
                 ) -> RunResult:
    assert proc.stdin and proc.stdout and proc.stderr
    deadline = time.monotonic() + limits.timeout_s
    out, err = bytearray(), bytearray()
    err_total = 0
    sel = selectors.DefaultSelector()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        os.set_blocking(pipe.fileno(), False)
    if data:
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(proc.stderr, selectors.EVENT_READ)
    sent = 0
    outputs = {proc.stdout, proc.stderr}
    try:
        while outputs:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return RunResult(bytes(out), _tail(err), None, timed_out=True)
            for key, _ in sel.select(timeout=remaining):
                if key.fileobj is proc.stdin:
                    try:
                        sent += os.write(proc.stdin.fileno(), data[sent:sent + 65536])
                    except BlockingIOError:
                        continue
                    except OSError:
                        sent = len(data)  # it stopped reading: the rest will not be read
                    if sent >= len(data):
                        sel.unregister(proc.stdin)
                        with contextlib.suppress(OSError):
                            proc.stdin.close()
                    continue
                chunk = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
                if not chunk:
                    sel.unregister(key.fileobj)
                    outputs.discard(key.fileobj)  # type: ignore[arg-type]
                    continue
                if key.fileobj is proc.stdout:
                    out += chunk
                    if len(out) > limits.max_output_bytes:
                        return RunResult(bytes(out[:limits.max_output_bytes]), _tail(err),
                                         None, output_exceeded=True)
                else:
                    err_total += len(chunk)
                    err += chunk
                    del err[:-STDERR_KEPT]
                    if err_total > limits.max_output_bytes:
                        return RunResult(bytes(out), _tail(err), None, output_exceeded=True)
    finally:
        sel.close()
    # Both pipes closed: wait (without reaping, so the group id stays ours) for the exit.
    while True:
        status = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if status is not None:
            code = status.si_status if status.si_code == os.CLD_EXITED else -status.si_status
            return RunResult(bytes(out), _tail(err), code)
        if time.monotonic() >= deadline:
            return RunResult(bytes(out), _tail(err), None, timed_out=True)
        time.sleep(0.005)


def _tail(err: bytearray) -> str:
    return bytes(err[-STDERR_KEPT:]).decode("utf-8", "replace")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill the program's whole process group (before reaping its leader, so the group id
    cannot have been reused), then reap it and close the pipes."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        with contextlib.suppress(OSError):
            if pipe is not None:
                pipe.close()
