"""[code_tests]: programs run against tests in a sandbox; malicious ones score 0 within their
limits and leave the reward function healthy."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from rlhfless.api.spec import RewardSpec, SpecError, parse_spec
from rlhfless.functions.app import create_app
from rlhfless.functions.reward import RewardHandler
from rlhfless.rewards import REWARDS, compute_rewards
from rlhfless.rewards.code_tests import extract_program, parse_tests, same_output
from rlhfless.rewards.sandbox import SandboxLimits, network_namespace_prefix, run_python

CODE = REWARDS["code_tests"]
ADD = {"inputs": ["1 2\n", "-5 5\n", "10 20\n"], "outputs": ["3\n", "0\n", "30\n"]}
GOOD = "```python\nprint(sum(map(int, input().split())))\n```"
FAST = {"timeout_s": 1.5, "memory_mb": 256, "max_output_kb": 64}


def fenced(program: str) -> str:
    return f"Here is my solution:\n```python\n{program}\n```\n"


def children() -> set[int]:
    """Live (non-zombie) processes whose parent is this test process."""
    me, found = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == me and state != "Z":
            found.add(int(entry.name))
    return found


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Sandbox directories go under tmp_path, so a test can see that none is left behind."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.fixture
def healthy_after(private_tmp):
    before = children()
    yield
    # The reward function is still healthy: a correct program scores 1 ...
    assert CODE("q", GOOD, {"answer": ADD}, **FAST) == 1.0
    # ... nothing the sandboxed programs started is still running, no sandbox dir is left.
    deadline = time.monotonic() + 30
    while children() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert children() - before == set()
    assert list(private_tmp.glob("rlhfless-sandbox-*")) == []


def score(program: str, tests=ADD, **limits) -> tuple[float, float]:
    started = time.monotonic()
    value = CODE("q", fenced(program), {"answer": tests}, **{**FAST, **limits})
    return value, time.monotonic() - started


def test_correct_partial_and_broken_programs(private_tmp):
    assert CODE("q", GOOD, {"answer": ADD}) == 1.0
    assert score("a, b = map(int, input().split())\nprint(a + b if a > 0 else 7)")[0] == \
        pytest.approx(2 / 3)
    assert score("print(")[0] == 0.0  # does not compile: no sandbox started
    assert score("raise SystemExit(1)")[0] == 0.0
    assert score("import sys\nprint(3)\nsys.exit(2)", tests={"inputs": ["1 2\n"],
                                                            "outputs": ["3\n"]})[0] == 0.0
    assert CODE("q", "no code here at all", {"answer": ADD}) == 0.0
    # tests stored as a JSON string (parquet) or as [{input, output}]
    as_json = json.dumps(ADD)
    assert CODE("q", GOOD, {"answer": as_json}, **FAST) == 1.0
    listed = [{"input": i, "output": o} for i, o in zip(ADD["inputs"], ADD["outputs"],
                                                         strict=True)]
    assert CODE("q", GOOD, {"answer": listed}, **FAST) == 1.0
    # files inside its own directory are fine; HOME is that directory
    assert score("import os\nopen('t.txt', 'w').write(input())\n"
                 "print(sum(map(int, open('t.txt').read().split())))\n"
                 "assert os.environ['HOME'] == os.getcwd()")[0] == 1.0


def test_threads_work_in_the_sandbox(private_tmp):
    # A common trick for deep recursion in contest solutions.
    program = ("import threading, sys\nsys.setrecursionlimit(10000)\nthreading.stack_size(1 << 24)"
               "\ndef main():\n    print(sum(map(int, input().split())))\n"
               "t = threading.Thread(target=main)\nt.start()\nt.join()")
    assert score(program)[0] == 1.0


def test_fork_bomb(healthy_after):
    value, elapsed = score("import os\nwhile True:\n    os.fork()")
    assert value == 0.0 and elapsed < 3 * FAST["timeout_s"] + 10
    value, _ = score("import multiprocessing as mp\nwhile True:\n    mp.Process(target=id, "
                     "args=(1,)).start()")
    assert value == 0.0
    value, _ = score("import subprocess\nsubprocess.Popen([sys.executable, '-c', 'pass'])")
    assert value == 0.0


def test_infinite_loop_is_killed_at_the_time_limit(healthy_after):
    value, elapsed = score("while True:\n    pass", timeout_s=1.0)
    assert value == 0.0
    assert elapsed < 3 * 1.0 + 10  # three tests, each killed at its limit
    # a program that blocks without using CPU (wall-time limit, not CPU time)
    value, _ = score("import time\ntime.sleep(3600)", timeout_s=1.0)
    assert value == 0.0


def test_writes_outside_its_dir(healthy_after, tmp_path):
    target = tmp_path / "outside" / "pwned.txt"
    target.parent.mkdir()
    victim = tmp_path / "outside" / "victim.txt"
    victim.write_text("keep me")
    for program in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nfd = os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)\nos.write(fd, b'x')",
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.rename({str(victim)!r}, 'mine.txt')",
        f"import os\nos.chdir({str(target.parent)!r})\nopen('pwned.txt', 'w').write('x')",
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')",
        f"import os\nd = os.open({str(target.parent)!r}, os.O_RDONLY)\n"
        "os.open('pwned.txt', os.O_CREAT | os.O_WRONLY, dir_fd=d)",
        "open('../escaped.txt', 'w').write('x')",
    ):
        value, _ = score(program + "\nprint(sum(map(int, input().split())))")
        assert value == 0.0, program
    assert not target.exists() and victim.read_text() == "keep me"
    assert list(tmp_path.glob("escaped.txt")) == []


def test_opens_a_socket(healthy_after):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        for program in (
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}))\n"
            "s.sendall(b'leak')",
            "import urllib.request\nurllib.request.urlopen('http://1.1.1.1')",
            "import socket\nsocket.getaddrinfo('example.com', 80)",
        ):
            value, _ = score(program + "\nprint(sum(map(int, input().split())))")
            assert value == 0.0, program
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever connected
    finally:
        server.close()


@pytest.mark.skipif(not network_namespace_prefix(),
                    reason="network namespaces (unshare --user --net) are not available here")
def test_network_namespace_alone_cuts_the_network():
    """The outer layer without the in-process guard: a plain program cannot reach the
    host's loopback from its namespace."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    probe = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), 2)\n"
             "    print('connected')\nexcept OSError as e:\n    print('refused', e.errno)")
    try:
        out = subprocess.run([*network_namespace_prefix(), sys.executable, "-c", probe],
                             capture_output=True, text=True, timeout=60)
        plain = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                               timeout=60)
    finally:
        server.close()
    assert plain.stdout.startswith("connected")  # the probe itself works
    assert out.stdout.startswith("refused"), out.stdout + out.stderr


def test_prints_gigabytes(healthy_after):
    started = time.monotonic()
    result = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 1_000_000)", "",
                        SandboxLimits(timeout_s=30, max_output_bytes=64 << 10))
    assert result.output_exceeded and not result.ok and len(result.stdout) == 64 << 10
    assert time.monotonic() - started < 20  # stopped by size, long before its time limit
    value, _ = score("import sys\nwhile True:\n    sys.stderr.write('e' * 1_000_000)",
                     timeout_s=30)
    assert value == 0.0
    value, _ = score("open('big', 'wb').write(b'x' * (64 << 20))\n"
                     "print(sum(map(int, input().split())))")  # file size limit
    assert value == 0.0


def test_reads_the_functions_environment(healthy_after, monkeypatch):
    monkeypatch.setenv("RLHFLESS_FUNCTION_TOKEN", "s3cret-token")
    tests = {"inputs": [""], "outputs": ["s3cret-token\n"]}
    for program in (
        "import os\nprint(os.environ.get('RLHFLESS_FUNCTION_TOKEN', ''))",
        "import os\nprint(os.environ.get('RLHFLESS_FUNCTION_TOKEN', ''))\n"
        "print(open(f'/proc/{os.getppid()}/environ').read())",
        "import os\nfor pid in os.listdir('/proc'):\n    try:\n"
        "        print(open(f'/proc/{pid}/environ').read())\n    except Exception:\n"
        "        pass\nprint(open('/proc/self/root/proc/1/environ').read())",
    ):
        value, _ = score(program, tests=tests)
        assert value == 0.0, program
    out = run_python("import os\nprint(sorted(os.environ))", "", SandboxLimits())
    assert out.ok and "RLHFLESS_FUNCTION_TOKEN" not in out.stdout.decode()


def test_memory_bomb_and_escape_hatches(healthy_after):
    for program in (
        "x = bytearray(4 << 30)",
        "x = []\nwhile True:\n    x.append(bytearray(1 << 24))",
        "import ctypes\nctypes.CDLL(None).fork()",
        "import os\nos.kill(os.getppid(), 9)",
        "import gc\nprint(len(gc.get_objects()))",
        "import sys\nf = sys._getframe(0)\nwhile f.f_back: f = f.f_back\n"
        "g = f.f_globals['_guard']\ng.__code__ = (lambda *a, **k: None).__code__\n"
        "import socket\nsocket.socket()",
    ):
        value, _ = score(program + "\nprint(sum(map(int, input().split())))")
        assert value == 0.0, program


def test_batch_is_scored_concurrently_and_healthz_answers_meanwhile(private_tmp):
    """A slow batch runs on the function's worker pool: 8 hung programs take about one time
    limit, not eight, and the function answers other requests meanwhile."""
    spec = RewardSpec(name="code_tests", args={"timeout_s": 2.0}, workers=8)
    hung = fenced("import time\ntime.sleep(3600)")
    tests = {"inputs": ["1 2\n"], "outputs": ["3\n"]}
    body = {"request_id": "slow", "items": [
        {"prompt": "q", "response": hung, "meta": {"answer": tests}} for _ in range(8)]}
    with TestClient(create_app(RewardHandler(spec), token="t"),
                    headers={"Authorization": "Bearer t"}) as client:
        reply: dict = {}

        def invoke() -> None:
            started = time.monotonic()
            reply["r"] = client.post("/invoke", json=body)
            reply["s"] = time.monotonic() - started

        thread = threading.Thread(target=invoke)
        thread.start()
        time.sleep(0.3)
        health_started = time.monotonic()
        health = client.get("/healthz")
        health_s = time.monotonic() - health_started
        thread.join(timeout=120)
        assert health.status_code == 200 and health.json()["ready"]
        assert health_s < 1.5 and thread.is_alive() is False
        assert reply["r"].status_code == 200, reply["r"].text
        assert reply["r"].json()["rewards"] == [0.0] * 8
        assert reply["s"] < 8 * 2.0  # side by side, not one after another
        good = client.post("/invoke", json={"request_id": "good", "items": [
            {"prompt": "q", "response": GOOD, "meta": {"answer": tests}}]})
        assert good.json()["rewards"] == [1.0]


def test_test_case_shapes_and_program_extraction():
    assert parse_tests(ADD) == list(zip(ADD["inputs"], ADD["outputs"], strict=True))
    for bad, message in (({"inputs": ["1"]}, "needs 'inputs' and 'outputs'"),
                         ({"fn_name": "f", "inputs": [], "outputs": []}, "function-call"),
                         ([{"input": "1"}], r"\[0\] needs 'input' and 'output'"),
                         ({"inputs": [], "outputs": []}, "no tests"),
                         ({"inputs": [1], "outputs": ["1"]}, "must be strings"),
                         ("{oops", "not JSON")):
        with pytest.raises(ValueError, match=message):
            parse_tests(bad)
    text = "```\nfirst\n```\nthen\n```python\nsecond\n```\nand\n```text\nthird\n```"
    assert extract_program(text) == "second\n"
    assert extract_program("```\nonly\n```") == "only\n"
    assert extract_program("print(1)") == "print(1)"
    assert same_output("3  \n\n", "3") and same_output("a\nb\n", "a \nb")
    assert not same_output("3\n4", "3")


def test_code_tests_args_are_checked_at_spec_validation():
    with pytest.raises(SpecError, match="timeout_s must be > 0"):
        parse_spec({"reward": {"name": "code_tests", "args": {"timeout_s": -1}}})
    with pytest.raises(SpecError, match="memory_mb must be >= 32"):
        parse_spec({"reward": {"name": "code_tests", "args": {"memory_mb": 1}}})
    with pytest.raises(SpecError, match="reward.workers"):
        parse_spec({"reward": {"name": "code_tests", "workers": 0}})


def test_compute_rewards_keeps_the_order(private_tmp):
    spec = RewardSpec(name="code_tests", args=FAST, workers=4)
    programs = [GOOD, fenced("print(-1)"), GOOD, "junk"]
    assert compute_rewards(spec, ["q"] * 4, programs, [{"answer": ADD}] * 4) == \
        [1.0, 0.0, 1.0, 0.0]


def test_the_whole_process_group_is_killed():
    """The layer under the guard: whatever a program started in its group dies with it."""
    from rlhfless.rewards.sandbox import _kill_group

    proc = subprocess.Popen(["sh", "-c", "sleep 600 & sleep 600 & echo started; wait"],
                            stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
    members = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
               and _pgid(int(p.name)) == proc.pid]
    assert len(members) >= 3  # the shell and its two sleeps
    _kill_group(proc)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in members) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in members)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
