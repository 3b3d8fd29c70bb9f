"""The Dockerfile's basics, checked by parsing it (`docker build` cannot run here).

Two variants from one multi-stage file (VARIANT=cpu|gpu); base images pinned to exact
tags; every pip package pinned; the GPU pins consistent with requirements-gpu.txt and
pyproject.toml; non-root runtime; no secrets; what is copied exists and is not ignored.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
GPU_REQUIREMENTS = REPO / "requirements-gpu.txt"
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|"
                         r"CREDENTIAL", re.IGNORECASE)
EXACT_TAG = re.compile(r"^[\w.\-/]+:(\d+\.\d+(\.\d+)?[\w.\-]*)(@sha256:[0-9a-f]{64})?$")
DIGEST = re.compile(r"^[\w.\-/:]+@sha256:[0-9a-f]{64}$")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [args for inst, args in self.instructions if inst == op]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        op, _, args = full.partition(" ")
        out.append((op.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, in order."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for op, args in instructions(text):
        if op == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif op == "ARG" and not stages:
            key, _, default = args.partition("=")
            global_args[key] = default.strip('"')
        else:
            assert stages, f"{op} before the first FROM"
            stages[-1].instructions.append((op, args))
    return global_args, stages


GLOBAL_ARGS, STAGES = parse(DOCKERFILE)
BY_NAME = {s.name: s for s in STAGES if s.name}
RUNTIME_STAGES = ("cpu", "gpu")


def expand(value: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GLOBAL_ARGS.get(m.group(1), m.group(0)), value)


def pip_requirements(stage: Stage) -> list[str]:
    """Package arguments of every `pip install` in the stage's RUN lines."""
    found = []
    for run in stage.all("RUN"):
        lexer = shlex.shlex(run, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        commands: list[list[str]] = [[]]
        for token in lexer:
            if token in ("&&", ";", "||", "|"):
                commands.append([])
            else:
                commands[-1].append(token)
        for words in commands:
            if words[:2] != ["pip", "install"]:
                continue
            skip_next = False
            for word in words[2:]:
                if skip_next:
                    skip_next = False
                    continue
                if word in ("-r", "--requirement", "--index-url", "-i", "-c"):
                    skip_next = True
                    continue
                if word.startswith("-"):
                    continue
                found.append(word)
    return found


def gpu_pins() -> dict[str, tuple[str, str]]:
    """canonical name -> (name, version) from requirements-gpu.txt; every line must pin."""
    pins = {}
    for line in GPU_REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==" and "*" not in spec.version, f"not pinned: {line}"
        pins[canonicalize_name(req.name)] = (req.name, spec.version)
    return pins


# -- structure --------------------------------------------------------------------------

def test_variant_selects_a_multi_stage_build() -> None:
    assert GLOBAL_ARGS["VARIANT"] == "cpu"
    assert {"cpu-build", "cpu", "gpu-build", "gpu"} <= set(BY_NAME)
    final = STAGES[-1]
    assert final.base == "${VARIANT}" and not final.instructions
    for variant in RUNTIME_STAGES:  # whatever VARIANT names must be a stage
        assert variant in BY_NAME
    # runtime stages copy the environment from their own build stage only
    assert BY_NAME["cpu"].all("COPY") == ["--from=cpu-build /opt/venv /opt/venv"]
    assert BY_NAME["gpu"].all("COPY") == ["--from=gpu-build /opt/venv /opt/venv"]


def test_base_images_are_pinned() -> None:
    stage_names = set(BY_NAME)
    for stage in STAGES:
        image = expand(stage.base)
        if image in stage_names:
            continue
        assert "$" not in image, f"unresolved base image {stage.base}"
        assert ":latest" not in image
        assert EXACT_TAG.match(image) or DIGEST.match(image), f"not an exact tag: {image}"
    gpu_bases = {expand(BY_NAME[s].base) for s in ("gpu-build", "gpu")}
    assert all(b.startswith("nvidia/cuda:") for b in gpu_bases)
    # the build and runtime CUDA images are the same release (the venv moves between them)
    assert len({b.split(":")[1].split("-")[0] for b in gpu_bases}) == 1
    assert len({b.rsplit("-", 1)[1] for b in gpu_bases}) == 1  # same OS


def test_runtime_stages_run_as_non_root() -> None:
    for name in RUNTIME_STAGES:
        users = BY_NAME[name].all("USER")
        assert users, f"{name}: no USER"
        uid, _, gid = users[-1].partition(":")
        assert uid.isdigit() and int(uid) > 0, f"{name}: USER must be a numeric non-root uid"
        assert not gid or (gid.isdigit() and int(gid) > 0)
    # matches the chart's pod securityContext (runAsUser) so volumes stay writable
    values = yaml.safe_load((REPO / "charts" / "rlhfless" / "values.yaml").read_text())
    assert BY_NAME["cpu"].all("USER")[-1] == (f"{values['podSecurityContext']['runAsUser']}:"
                                              f"{values['podSecurityContext']['runAsGroup']}")
    # ...and the uid the operator gives function and driver pods.
    from rlhfless.knative.pods import IMAGE_UID

    for name in RUNTIME_STAGES:
        assert BY_NAME[name].all("USER")[-1] == f"{IMAGE_UID}:{IMAGE_UID}"


def test_no_secrets_in_the_image() -> None:
    for stage in STAGES:
        for op, args in stage.instructions:
            if op in ("ENV", "ARG", "LABEL"):
                names = re.findall(r"(\w+)=", args) or [args.split()[0]]
                for name in names:
                    assert not SECRET_NAME.search(name), f"{op} {name} looks like a secret"
            if op in ("COPY", "ADD"):
                assert not re.search(r"\.env\b|\.pem\b|id_rsa|\.ssh|\.netrc|\.pypirc", args)
            if op == "ADD":
                pytest.fail("use COPY (ADD fetches URLs and unpacks archives)")
            if op == "RUN":
                assert not re.search(r"(curl|wget)[^|]*\|\s*(sh|bash)", args), args
    for var in GLOBAL_ARGS:
        assert not SECRET_NAME.search(var)


def test_healthcheck_and_entrypoint_match_the_chart_and_functions() -> None:
    from rlhfless.knative.services import FUNCTION_PORT

    values = yaml.safe_load((REPO / "charts" / "rlhfless" / "values.yaml").read_text())
    assert "rlhfless" in PYPROJECT["project"]["scripts"]
    for name in RUNTIME_STAGES:
        stage = BY_NAME[name]
        (check,) = stage.all("HEALTHCHECK")
        assert f"127.0.0.1:{FUNCTION_PORT}/healthz" in check
        assert stage.all("ENTRYPOINT") == ['["rlhfless"]']
    cmd = BY_NAME["cpu"].all("CMD")[-1]
    op = values["operator"]
    assert cmd == (f'["operator", "--liveness", "http://0.0.0.0:{op["livenessPort"]}/healthz", '
                   f'"--metrics-port", "{op["metricsPort"]}"]')
    assert op["livenessPort"] == FUNCTION_PORT  # one HEALTHCHECK serves both roles


# -- pins -------------------------------------------------------------------------------

def test_every_pip_install_is_pinned() -> None:
    for stage in STAGES:
        for req in pip_requirements(stage):
            if req == ".":
                continue
            if req.startswith("$(grep"):  # the pin is read from the requirements file
                assert req == "$(grep -E '^torch==' requirements-gpu.txt)", req
                continue
            parsed = Requirement(req)
            assert str(parsed.specifier).startswith("=="), f"{stage.name}: unpinned {req}"


def test_cpu_torch_pin_is_the_projects() -> None:
    (torch_dep,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch")]
    assert torch_dep == "torch==2.13.0"
    assert torch_dep in pip_requirements(BY_NAME["cpu-build"])
    assert "download.pytorch.org/whl/cpu" in " ".join(BY_NAME["cpu-build"].all("RUN"))


def test_gpu_requirements_pin_vllm_torch_deepspeed() -> None:
    pins = gpu_pins()
    assert pins["vllm"][1] == "0.33.0"
    assert pins["torch"][1] == "2.14.0"  # what vllm 0.33.0 pins
    assert pins["deepspeed"][1] == "0.19.8"
    # vLLM's torch pin cannot resolve against pyproject's: no `gpu` extra that would try
    assert "gpu" not in PYPROJECT["project"].get("optional-dependencies", {})
    run = " ".join(BY_NAME["gpu-build"].all("RUN"))
    assert "grep -E '^torch==' requirements-gpu.txt" in run  # torch first, same pin
    assert "--no-build-isolation -r requirements-gpu.txt" in run  # deepspeed vs that torch
    assert "--no-deps ." in run  # pyproject's CPU torch pin must not apply


def test_gpu_requirements_cover_the_package_dependencies() -> None:
    """rlhfless is installed with --no-deps in the GPU image, so every runtime dependency
    but torch must be pinned in requirements-gpu.txt, within pyproject's range."""
    pins = gpu_pins()
    for dep in PYPROJECT["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{req.name} missing from requirements-gpu.txt"
        assert req.specifier.contains(pins[name][1]), (
            f"{req.name}=={pins[name][1]} outside pyproject's {req.specifier}")


def test_build_tools_satisfy_vllm() -> None:
    """vLLM 0.33 requires setuptools>=78.1.1,<81 on Python 3.12 (the GPU image's python3):
    the setuptools the GPU build installs first must be one it accepts."""
    (setuptools,) = [Requirement(r) for r in pip_requirements(BY_NAME["gpu-build"])
                     if r.startswith("setuptools")]
    version = str(setuptools.specifier).removeprefix("==")
    assert SpecifierSet(">=78.1.1,<81").contains(version), version


def test_gpu_image_spawns_vllm_workers() -> None:
    """CUDA is initialised in the function process before vLLM starts its workers."""
    env = " ".join(BY_NAME["gpu"].all("ENV"))
    assert "VLLM_WORKER_MULTIPROC_METHOD=spawn" in env


def test_gpu_torch_differs_from_cpu_torch() -> None:
    cpu = [r for r in pip_requirements(BY_NAME["cpu-build"]) if r.startswith("torch==")]
    assert cpu == ["torch==2.13.0"] and gpu_pins()["torch"][1] != "2.13.0"


# -- build context ----------------------------------------------------------------------

def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def ignored(path: str) -> bool:
    result = False
    for pattern in dockerignore():
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        hit = any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/"))
                  for p in _prefixes(path))
        if hit:
            result = not negate
    return result


def _prefixes(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def test_copied_files_exist_and_are_in_the_build_context() -> None:
    for stage in STAGES:
        for args in stage.all("COPY"):
            if args.startswith("--from="):
                continue
            *sources, _dest = args.split()
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
                assert not ignored(src), f"COPY {src}: excluded by .dockerignore"


def test_dockerignore_keeps_local_state_out() -> None:
    for path in (".git", ".venv", ".tools", "runs", ".env", "tests", "rlhfless/__pycache__"):
        assert ignored(path), f"{path} would be sent to the build context"
    for path in ("rlhfless/api/spec.py", "pyproject.toml", "requirements-gpu.txt"):
        assert not ignored(path), path
