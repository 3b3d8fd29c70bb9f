"""Versioned weights shared by every stage function; the store owns its layout.

Layout under `root`:
    base/            config.json, tokenizer files, base.json (how to rebuild the model)
    v{n}/            {part}.safetensors (default part "model"; "critic"; "optimizer", the
                     trainer's state after producing v{n}, see store.optimizer) + manifest.json
A version directory is written in a hidden temp directory and renamed into place, so a
reader sees a version completely or not at all. manifest.json records every file's sha256;
`load` verifies them, so a truncated or corrupted file is reported, never half-loaded.

Append-only: a version, once published, is never rewritten (`VersionExistsError`); only
`prune` deletes old versions (version 0, the reference policy, always stays). Everything here
is safetensors or JSON: nothing in the store is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rlhfless.store.atomic import atomic_dir, fsync_dir, fsync_file

MANIFEST = "manifest.json"
DEFAULT_PART = "model"
_VERSION_DIR = re.compile(r"^v(\d+)$")
_PART_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class WeightStoreError(RuntimeError):
    """A version is missing, corrupt, or cannot be written; the message says which and why."""


class VersionExistsError(WeightStoreError):
    """A write asked for a version number that is already published (never rewritten)."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _dedupe_shared(tensors: Mapping[str, torch.Tensor]) -> tuple[dict, dict[str, str]]:
    """Tied weights (lm_head = embedding) share storage, which safetensors refuses; keep the
    first name and record the others as aliases restored on load. Other views into a storage
    already written (rare) are copied."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    same_view: dict[tuple[int, int, tuple, tuple], str] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        t = tensor.detach()
        storage = t.untyped_storage().data_ptr()
        ident = (storage, t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() and ident in same_view:
            aliases[name] = same_view[ident]
            continue
        same_view[ident] = name
        t = t.to("cpu").contiguous()
        kept[name] = t.clone() if t.numel() and storage in storages else t
        storages.add(storage)
    return kept, aliases


class WeightStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    # ---- paths -----------------------------------------------------------------------------
    def path(self, version: int) -> Path:
        return self.root / f"v{int(version)}"

    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    # ---- listing ---------------------------------------------------------------------------
    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _VERSION_DIR.match(entry.name)
            if match and (entry / MANIFEST).is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def exists(self, version: int) -> bool:
        return (self.path(version) / MANIFEST).is_file()

    # ---- writing ---------------------------------------------------------------------------
    def save(
        self,
        version: int,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write `tensors` as version `version` (part "model"); returns the version dir."""
        return self.save_parts(version, {DEFAULT_PART: tensors}, meta)

    def save_parts(
        self,
        version: int,
        parts: Mapping[str, Mapping[str, torch.Tensor]],
        meta: Mapping[str, Any] | None = None,
        headers: Mapping[str, Mapping[str, str]] | None = None,
    ) -> Path:
        """Several named tensor sets in one version (e.g. "model", "critic", "optimizer").

        `headers[part]` goes into that file's safetensors header (covered by its sha256).
        Raises VersionExistsError if `version` is already published: versions are immutable.
        """
        if int(version) < 0:
            raise WeightStoreError(f"version must be >= 0, got {version}")
        if not parts:
            raise WeightStoreError("nothing to save: no parts given")
        for name in parts:
            if not _PART_NAME.match(name):
                raise WeightStoreError(f"bad part name '{name}' (letters, digits, _ . - only)")
        final = self.path(version)
        if self.exists(version):
            raise VersionExistsError(f"version {version} already exists; versions are never "
                                     "rewritten")
        staging = final.with_name(f".new-{final.name}-{uuid.uuid4().hex[:8]}")
        with atomic_dir(staging) as tmp:
            files: dict[str, dict[str, Any]] = {}
            for name, tensors in parts.items():
                kept, aliases = _dedupe_shared(tensors)
                file = tmp / f"{name}.safetensors"
                header = {"format": "pt", **dict((headers or {}).get(name, {}))}
                save_file(kept, str(file), metadata=header)
                file.chmod(0o644)  # readable by every stage function, whoever runs it
                fsync_file(file)
                files[file.name] = {
                    "sha256": sha256_file(file),
                    "bytes": file.stat().st_size,
                    "aliases": aliases,
                }
            manifest = {
                "version": int(version),
                "created": time.time(),
                "files": files,
                "meta": dict(meta or {}),
            }
            manifest_path = tmp / MANIFEST
            manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
            fsync_file(manifest_path)
        try:
            self._publish(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final

    def _publish(self, staged: Path, final: Path) -> None:
        if self.exists(int(final.name[1:])):
            raise VersionExistsError(f"version {final.name[1:]} already exists; versions are "
                                     "never rewritten")
        try:
            # Atomic on one filesystem. It fails if a published (non-empty) `final` appeared
            # meanwhile; it may replace an empty leftover directory, which is no version.
            os.rename(staged, final)
        except OSError as exc:
            if self.exists(int(final.name[1:])):
                raise VersionExistsError(f"version {final.name[1:]} was published by another "
                                         "writer meanwhile") from exc
            raise WeightStoreError(f"cannot publish version {final.name}: {exc}") from exc
        fsync_dir(self.root)

    def next_version(self) -> int:
        """One above every version number used so far, published or left half-written (a
        step that never reached its checkpoint leaves its version behind: it is skipped)."""
        if not self.root.is_dir():
            return 0
        used = [int(m.group(1)) for e in self.root.iterdir()
                if (m := _VERSION_DIR.match(e.name))]
        return max(used) + 1 if used else 0

    # ---- pruning ---------------------------------------------------------------------------
    def prune(self, current: int, keep: int) -> list[int]:
        """Delete versions older than the `keep` newest up to `current` (never version 0,
        the reference policy), optimizer state included. Returns the versions deleted."""
        gone = [v for v in self.versions() if 0 < v <= current - keep]
        for v in gone:
            shutil.rmtree(self.path(v), ignore_errors=True)
        return gone

    # ---- reading ---------------------------------------------------------------------------
    def manifest(self, version: int) -> dict[str, Any]:
        directory = self.path(version)
        path = directory / MANIFEST
        if not path.is_file():
            have = self.versions()
            raise WeightStoreError(
                f"version {version} not found in weight store {self.root} (have: {have or 'none'})"
            )
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise WeightStoreError(f"corrupt manifest {path}: {exc}") from exc

    def meta(self, version: int) -> dict[str, Any]:
        return dict(self.manifest(version).get("meta", {}))

    def parts(self, version: int) -> list[str]:
        return [name.removesuffix(".safetensors") for name in self.manifest(version)["files"]]

    def _file(self, version: int, part: str) -> tuple[Path, dict[str, Any]]:
        """(file, manifest entry) of one part; WeightStoreError if unknown or missing."""
        manifest = self.manifest(version)
        name = f"{part}.safetensors"
        entry = manifest.get("files", {}).get(name)
        if entry is None:
            raise WeightStoreError(
                f"version {version} has no part '{part}' (has: {self.parts(version)})"
            )
        file = self.path(version) / name
        if not file.is_file():
            raise WeightStoreError(f"corrupt version {version}: {file} is missing")
        return file, entry

    def _check_hash(self, version: int, file: Path, entry: dict[str, Any]) -> None:
        got = sha256_file(file)
        if got != entry["sha256"]:
            raise WeightStoreError(
                f"corrupt version {version}: {file} sha256 {got[:12]}… does not match the "
                f"manifest's {entry['sha256'][:12]}… (truncated or modified file)"
            )

    def verify(self, version: int) -> None:
        """Check every file of a version against its manifest; the error names the file."""
        for part in self.parts(version):
            file, entry = self._file(version, part)
            self._check_hash(version, file, entry)

    def header(self, version: int, part: str) -> dict[str, str]:
        """The safetensors header metadata of one part (call after `load` verified it)."""
        file, _ = self._file(version, part)
        try:
            with safe_open(str(file), framework="pt") as handle:
                return dict(handle.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightStoreError(f"corrupt version {version}: cannot read {file}: {exc}") from exc

    def load(
        self, version: int, part: str = DEFAULT_PART, *, verify: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, meta) of one version; raises WeightStoreError if missing or corrupt."""
        file, entry = self._file(version, part)
        if verify:
            self._check_hash(version, file, entry)
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightStoreError(f"corrupt version {version}: cannot read {file}: {exc}") from exc
        for alias, target in entry.get("aliases", {}).items():
            tensors[alias] = tensors[target]
        return tensors, self.meta(version)
