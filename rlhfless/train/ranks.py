"""The ranks of one learner instance: rank 0 (the process that serves HTTP) and its followers.

    group = RankGroup.start(world, "package.module:factory", config)
    group.call("add", payload)          # every rank runs target.add(payload), in lockstep
    group.close()

Why not torchrun: an instance is one process to its runtime (a local process, a Knative
pod), listening on one port and reporting ready once its model is loaded. Rank 0 is that
process; it starts world − 1 followers itself (`python -m rlhfless.train.ranks`, same
interpreter and import path), so neither runtime knows about ranks and a scaled-to-zero
instance takes all its ranks with it.

Each rank builds its own target, `factory(config, ranks)` (rlhfless.train.distributed.Ranks),
and then runs the same method calls in the same order. Calls travel as JSON lines on each
follower's stdin (rank 0 round-trips its own arguments through JSON too, so every rank sees
the same floats); each follower answers on a status pipe. Waiting between requests costs no
collective, so an idle instance never times out.

Failures. A request error (the target's `request_errors`, e.g. a group that is not part of
the step) is raised before any collective on every rank alike: rank 0 re-raises it and the
ranks carry on. Anything else means the ranks may be out of step: a follower exits at once;
rank 0 notices (its status pipe closes, or the follower's process ends) and the group is
broken — `on_failure` (default: end the process, so that the runtime replaces the
instance; the driver then begins the step again on a fresh learner).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from rlhfless.orphans import exit_with_parent
from rlhfless.train.distributed import Ranks, close_ranks, init_ranks

LOOPBACK = "127.0.0.1"


class RanksFailed(RuntimeError):
    """The ranks of the instance are no longer in step (a rank failed or exited)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def load_factory(spec: str) -> Callable[[dict[str, Any], Ranks], Any]:
    """'package.module:function' -> the function."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"factory must look like 'package.module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _exit_now(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(1)


def _request_errors(target: Any) -> tuple[type[BaseException], ...]:
    return tuple(getattr(target, "request_errors", ()))


class RankGroup:
    """Rank 0's side: the target it runs itself and the followers it relays calls to."""

    def __init__(self, ranks: Ranks, target: Any, followers: list[subprocess.Popen],
                 status: list[Any], on_failure: Callable[[str], None]) -> None:
        self.ranks = ranks
        self.target = target
        self._followers = followers
        self._status = status
        self._on_failure = on_failure
        self._closing = False
        self._broken: str | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, name="rank-watch", daemon=True).start()

    @property
    def world(self) -> int:
        return self.ranks.world

    @classmethod
    def start(cls, world: int, factory: str, config: dict[str, Any], *,
              device_type: str | None = None,
              on_failure: Callable[[str], None] | None = None,
              threads: int = 0) -> RankGroup:
        """Start followers 1..world-1, join the process group, build every rank's target.

        `threads`: torch threads per follower (0: torch's default)."""
        if world < 1:
            raise ValueError(f"world must be >= 1, got {world}")
        fail = on_failure or _exit_now
        port = free_port()
        env = dict(os.environ)
        # Followers import exactly what this process imports.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        blob = json.dumps(config)
        followers, status = [], []
        for rank in range(1, world):
            read_fd, write_fd = os.pipe()
            cmd = [sys.executable, "-m", "rlhfless.train.ranks", "--rank", str(rank),
                   "--world", str(world), "--port", str(port), "--factory", factory,
                   "--status-fd", str(write_fd), "--parent", str(os.getpid()),
                   "--threads", str(threads)]
            if device_type:
                cmd += ["--device", device_type]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env, pass_fds=(write_fd,),
                                    text=True)
            os.close(write_fd)
            assert proc.stdin is not None
            proc.stdin.write(blob + "\n")
            proc.stdin.flush()
            followers.append(proc)
            status.append(os.fdopen(read_fd, "r"))
        starting = _Startup(followers, fail)
        try:
            ranks = init_ranks(0, world, LOOPBACK, port, device_type=device_type)
            target = load_factory(factory)(config, ranks)
        except BaseException:
            starting.stop()
            for proc in followers:
                proc.kill()
            close_ranks()
            raise
        group = cls(ranks, target, followers, status, fail)
        starting.stop()
        for rank, pipe in enumerate(status, start=1):
            line = pipe.readline()
            if not line or not json.loads(line).get("ok"):
                group._fail(f"learner rank {rank} did not start")
        return group

    def call(self, method: str, *args: Any) -> Any:
        """`target.method(*args)` on every rank; rank 0's result (or its request error)."""
        with self._lock:
            if self._broken:
                raise RanksFailed(self._broken)
            message = json.dumps({"method": method, "args": list(args)})
            for rank, proc in enumerate(self._followers, start=1):
                try:
                    assert proc.stdin is not None
                    proc.stdin.write(message + "\n")
                    proc.stdin.flush()
                except OSError:
                    self._fail(f"learner rank {rank} is gone")
            local_args = json.loads(message)["args"]
            error: BaseException | None = None
            result = None
            try:
                result = getattr(self.target, method)(*local_args)
            except _request_errors(self.target) as exc:
                error = exc
            except BaseException as exc:
                self._fail(f"learner rank 0 failed in {method}: {exc!r}")
                raise
            for rank, pipe in enumerate(self._status, start=1):
                line = pipe.readline()
                if not line:
                    self._fail(f"learner rank {rank} exited during {method}")
                reply = json.loads(line)
                if reply["ok"] != (error is None):
                    self._fail(f"learner ranks diverged in {method}: rank 0 "
                               f"{'failed' if error else 'succeeded'}, rank {rank} "
                               f"{'succeeded' if reply['ok'] else 'failed'}")
            if error is not None:
                raise error
            return result

    def close(self) -> None:
        """Stop the followers (they leave the process group) and leave it too."""
        with self._lock:
            self._closing = True
            for proc in self._followers:
                try:
                    assert proc.stdin is not None
                    proc.stdin.close()  # end of input: the follower leaves
                except OSError:
                    pass
            deadline = time.monotonic() + 30
            for proc in self._followers:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for pipe in self._status:
                pipe.close()
            close_ranks()

    def _fail(self, reason: str) -> None:
        self._broken = reason
        for proc in self._followers:
            if proc.poll() is None:
                proc.kill()
        self._on_failure(reason)
        raise RanksFailed(reason)

    def _watch(self) -> None:
        """A follower that exits while the group is open breaks it: under NCCL rank 0 might
        otherwise wait in a collective until the timeout."""
        while not self._closing and not self._broken:
            for rank, proc in enumerate(self._followers, start=1):
                code = proc.poll()
                if code is not None and not self._closing and not self._broken:
                    self._broken = f"learner rank {rank} exited with code {code}"
                    for other in self._followers:
                        if other.poll() is None:
                            other.kill()
                    self._on_failure(self._broken)
                    return
            time.sleep(0.5)


class _Startup:
    """Watches the followers while rank 0 waits to join them (a follower that dies while
    starting would leave it waiting for the rendezvous)."""

    def __init__(self, followers: list[subprocess.Popen], fail: Callable[[str], None]):
        self._followers = followers
        self._fail = fail
        self._stopped = threading.Event()
        threading.Thread(target=self._run, name="rank-startup", daemon=True).start()

    def _run(self) -> None:
        while not self._stopped.wait(0.5):
            for rank, proc in enumerate(self._followers, start=1):
                code = proc.poll()
                if code is not None and not self._stopped.is_set():
                    self._stopped.set()
                    self._fail(f"learner rank {rank} exited with code {code} while starting")
                    return

    def stop(self) -> None:
        self._stopped.set()


# ---- a follower ---------------------------------------------------------------------------
def follower_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A follower rank of a learner instance.")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--factory", required=True)
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    exit_with_parent(args.parent, code=1)
    status = os.fdopen(args.status_fd, "w")

    def report(ok: bool, error: str = "") -> None:
        status.write(json.dumps({"ok": ok, "error": error}) + "\n")
        status.flush()

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = json.loads(sys.stdin.readline())
    ranks = init_ranks(args.rank, args.world, LOOPBACK, args.port, device_type=args.device)
    try:
        target = load_factory(args.factory)(config, ranks)
    except BaseException:
        traceback.print_exc()
        report(False, "could not build the target")
        os._exit(1)
    report(True)
    expected = _request_errors(target)
    for line in sys.stdin:
        message = json.loads(line)
        try:
            getattr(target, message["method"])(*message["args"])
        except expected as exc:
            report(False, str(exc))
            continue
        except BaseException:
            # Out of step with the other ranks from here on: leave, rank 0 notices.
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        report(True)
    close_ranks()


if __name__ == "__main__":
    follower_main()
