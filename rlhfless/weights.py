"""Versioned weight store shared by every stage function.

Layout under `root`:
    base/            config.json, tokenizer files, base.json (how to rebuild the model)
    v{n}/            {part}.safetensors (default part "model") + manifest.json
A version directory is written in a hidden temp directory and renamed into place, so a
reader sees a version completely or not at all. manifest.json records every file's sha256;
`load` verifies them, so a truncated or corrupted file is reported, never half-loaded.
"""

from __future__ import annotations

import copy
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
DEFAULT_PART = "model"
_VERSION_DIR = re.compile(r"^v(\d+)$")
_PART_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class WeightStoreError(RuntimeError):
    """A version is missing, corrupt, or cannot be written; the message says which and why."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
        *,
        overwrite: bool = False,
    ) -> Path:
        """Write `tensors` as version `version` (part "model"); returns the version dir."""
        return self.save_parts(version, {DEFAULT_PART: tensors}, meta, overwrite=overwrite)

    def save_parts(
        self,
        version: int,
        parts: Mapping[str, Mapping[str, torch.Tensor]],
        meta: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
    ) -> Path:
        """Several named tensor sets in one version (e.g. "model" and "critic")."""
        if int(version) < 0:
            raise WeightStoreError(f"version must be >= 0, got {version}")
        if not parts:
            raise WeightStoreError("nothing to save: no parts given")
        for name in parts:
            if not _PART_NAME.match(name):
                raise WeightStoreError(f"bad part name '{name}' (letters, digits, _ . - only)")
        final = self.path(version)
        if final.exists() and not overwrite:
            raise WeightStoreError(f"version {version} already exists at {final}")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-v{version}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            files: dict[str, dict[str, Any]] = {}
            for name, tensors in parts.items():
                kept, aliases = _dedupe_shared(tensors)
                file = tmp / f"{name}.safetensors"
                save_file(kept, str(file), metadata={"format": "pt"})
                file.chmod(0o644)  # readable by every stage function, whoever runs it
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
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
            with open(manifest_path, "rb+") as handle:
                os.fsync(handle.fileno())
            _fsync_dir(tmp)
            self._publish(tmp, final, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _publish(self, tmp: Path, final: Path, overwrite: bool) -> None:
        old = None
        if final.exists() and overwrite:
            old = self.root / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        try:
            os.rename(tmp, final)  # atomic on one filesystem; fails if `final` appeared meanwhile
        except OSError as exc:
            if old is not None:
                os.rename(old, final)
            raise WeightStoreError(f"cannot publish version at {final}: {exc}") from exc
        _fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

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

    def load(
        self, version: int, part: str = DEFAULT_PART, *, verify: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, meta) of one version; raises WeightStoreError if missing or corrupt."""
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
        if verify:
            got = sha256_file(file)
            if got != entry["sha256"]:
                raise WeightStoreError(
                    f"corrupt version {version}: {file} sha256 {got[:12]}… does not match the "
                    f"manifest's {entry['sha256'][:12]}… (truncated or modified file)"
                )
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightStoreError(f"corrupt version {version}: cannot read {file}: {exc}") from exc
        for alias, target in entry.get("aliases", {}).items():
            tensors[alias] = tensors[target]
        return tensors, dict(manifest.get("meta", {}))


# ---- the base model in the store ---------------------------------------------------------------
def _spec_record(spec: Any) -> dict[str, Any]:
    tiny = getattr(spec, "tiny", None)
    tiny_record = None
    if spec.source == "tiny" and tiny is not None:
        fields = ("vocab_size", "n_layer", "n_embd", "n_head", "n_positions", "seed")
        tiny_record = {k: getattr(tiny, k) for k in fields}
    return {
        "source": spec.source,
        "path": getattr(spec, "path", None),
        "gguf_file": getattr(spec, "gguf_file", None),
        "tiny": tiny_record,
    }


def materialize_base(
    spec: Any, store: WeightStore, loaded: tuple[torch.nn.Module, Any] | None = None
) -> Path:
    """Write the base model as version 0 (+ base/ config and tokenizer); returns v0's dir.

    Idempotent: a store that already holds this base returns at once; one holding a different
    base is an error. Afterwards `load_from_store` rebuilds the model without the original
    source (a GGUF is dequantised once here, not in every stage function). `loaded` is the
    (model, tokenizer) of `spec` when the caller already has it (skips a second load).
    """
    record = _spec_record(spec)
    base_json = store.base_dir / "base.json"
    if base_json.is_file() and store.exists(0):
        stored = json.loads(base_json.read_text())["spec"]
        if stored != record:
            raise WeightStoreError(
                f"weight store {store.root} already holds a different base model: {stored}"
            )
        return store.path(0)

    from rlhfless.model.loading import load_base

    model, tok = loaded if loaded is not None else load_base(spec)
    # A dequantised GGUF still carries its quantization_config; the stored weights are
    # plain floats, so drop it (otherwise transformers refuses to save or misloads).
    config = copy.deepcopy(model.config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    store.root.mkdir(parents=True, exist_ok=True)
    tmp = store.root / f".tmp-base-{uuid.uuid4().hex[:8]}"
    try:
        config.save_pretrained(str(tmp))
        tok.save(tmp / "tokenizer")
        info = {
            "spec": record,
            "architecture": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "tokenizer": tok.kind,
        }
        (tmp / "base.json").write_text(json.dumps(info, indent=1, sort_keys=True))
        if store.base_dir.exists():
            shutil.rmtree(store.base_dir)  # a base without v0 is a leftover of a failed run
        os.rename(tmp, store.base_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return store.save(0, model.state_dict(), {"base": record}, overwrite=store.exists(0))


def load_from_store(
    store: WeightStore, version: int | None = None, part: str = DEFAULT_PART
) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer) for a stored version (default: the latest)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhfless.model.tokenizer import load_tokenizer

    if version is None:
        version = store.latest()
        if version is None:
            raise WeightStoreError(f"weight store {store.root} holds no versions")
    base = store.base_dir
    if not (base / "config.json").is_file():
        raise WeightStoreError(f"weight store {store.root} has no base (run materialize_base)")
    tensors, _ = store.load(version, part)
    info = json.loads((base / "base.json").read_text())
    config = AutoConfig.from_pretrained(str(base), local_files_only=True)
    dtype = getattr(torch, info.get("dtype", "float32"))
    # Parameters on the meta device (no random init), then adopt the stored tensors.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()  # a tied lm_head may be absent from the tensors; it follows the embedding
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing or result.unexpected_keys:
        raise WeightStoreError(
            f"version {version} does not fit the base model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval(), load_tokenizer(base / "tokenizer")
