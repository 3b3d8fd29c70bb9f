"""Export one weight-store version as a plain Hugging Face model directory.

    out/config.json          the base config (no quantization_config: the store holds floats)
    out/generation_config.json  its special token ids (bos, eos, pad)
    out/model.safetensors    the version's weights (a hard link to the store file when possible)
    out/<tokenizer files>    the base tokenizer (HF tokenizers only; tiny models have none)
    out/rlhfless_export.json which store version this directory holds

transformers (`from_pretrained`) and vLLM (`LLM(model=out)`, `reload_weights(weights_path=out)`)
load it as they would a checkpoint from the hub. The directory is written under a temporary
name and renamed into place, so a loader never sees half an export.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from rlhfless.store import DEFAULT_PART, WeightStore, WeightStoreError, sha256_file

EXPORT_RECORD = "rlhfless_export.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"


def export_version(
    store: WeightStore,
    version: int,
    out_dir: str | os.PathLike,
    *,
    link: bool = True,
    verify: bool = True,
    part: str = DEFAULT_PART,
) -> Path:
    """Write version `version` of `store` as an HF directory at `out_dir`; returns it.

    link: hard-link the weights file instead of copying it (no extra disk, and the export
      survives the store pruning the version); falls back to a copy across filesystems.
    verify: check the weights file against the manifest's sha256 first.
    An existing `out_dir` holding the same version is returned as is; any other is replaced.
    """
    out = Path(out_dir)
    manifest = store.manifest(version)  # raises WeightStoreError naming what exists
    entry = manifest.get("files", {}).get(f"{part}.safetensors")
    if entry is None:
        raise WeightStoreError(f"version {version} has no part '{part}'")
    source = store.path(version) / f"{part}.safetensors"
    if not source.is_file():
        raise WeightStoreError(f"corrupt version {version}: {source} is missing")
    if verify and sha256_file(source) != entry["sha256"]:
        raise WeightStoreError(
            f"corrupt version {version}: {source} does not match its manifest sha256"
        )
    record = {"version": int(version), "store": str(store.root), "sha256": entry["sha256"]}
    if exported_record(out) == record:
        return out

    config = _base_config(store)
    aliases = entry.get("aliases", {})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / GENERATION_CONFIG).write_text(
            json.dumps(_generation_config(config), indent=2, sort_keys=True))
        _copy_tokenizer(store.base_dir / "tokenizer", tmp)
        if aliases and not config.get("tie_word_embeddings", True):
            # Shared tensors the config does not re-tie must be spelled out for a loader.
            _write_with_aliases(store, version, part, tmp / WEIGHTS_FILE)
        else:
            _place_weights(source, tmp / WEIGHTS_FILE, link)
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike,
               version: int | None = None) -> tuple[Path, int]:
    """Export a run's weights (default: the checkpointed version, else the newest) as a
    copy (the export must not share files with a store it may outlive); (dir, version)."""
    run_dir = Path(run_dir)
    root = run_dir / "store" if (run_dir / "store").is_dir() else run_dir
    store = WeightStore(root)
    if not store.versions():
        raise WeightStoreError(f"{run_dir} holds no weight store (expected {run_dir / 'store'} "
                               "with at least one version)")
    if version is None:
        from rlhfless.store import load_checkpoint

        checkpoint = load_checkpoint(run_dir)
        version = (checkpoint.weights_version
                   if checkpoint is not None and store.exists(checkpoint.weights_version)
                   else store.versions()[-1])
    return export_version(store, version, out_dir, link=False), version


def exported_record(directory: str | os.PathLike) -> dict | None:
    """The export record of `directory`, or None when it holds no (complete) export."""
    path = Path(directory) / EXPORT_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _base_config(store: WeightStore) -> dict:
    path = store.base_dir / "config.json"
    if not path.is_file():
        raise WeightStoreError(f"weight store {store.root} has no base (run materialize_base)")
    config = json.loads(path.read_text())
    # A dequantised GGUF's config may still name its quantisation; the stored weights are
    # plain floats and a loader would otherwise try to dequantise them again.
    config.pop("quantization_config", None)
    base_json = store.base_dir / "base.json"
    info = json.loads(base_json.read_text()) if base_json.is_file() else {}
    # A config saved from a model built with `from_config` names no architecture, and vLLM
    # picks its model class by that name; the store records it in base.json.
    if not config.get("architectures") and info.get("architecture"):
        config["architectures"] = [info["architecture"]]
    if info.get("dtype"):
        config["dtype"] = info["dtype"]
    return config


def _generation_config(config: dict) -> dict:
    """What `generate` needs from the model config (transformers reads the rest as defaults)."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    return {k: config[k] for k in keys if config.get(k) is not None}


def _copy_tokenizer(source: Path, dest: Path) -> None:
    """HF tokenizer files (tokenizer.json, tokenizer_config.json, ...) next to the config."""
    if not source.is_dir():
        return
    for item in source.iterdir():
        if item.is_file():
            shutil.copy2(item, dest / item.name)


def _place_weights(source: Path, dest: Path, link: bool) -> None:
    if link:
        try:
            os.link(source, dest)
            return
        except OSError:
            pass  # another filesystem, or links not allowed: copy instead
    shutil.copyfile(source, dest)


def _write_with_aliases(store: WeightStore, version: int, part: str, dest: Path) -> None:
    from safetensors.torch import save_file

    tensors, _ = store.load(version, part, verify=False)
    save_file(
        {k: v.contiguous().clone() for k, v in tensors.items()},
        str(dest),
        metadata={"format": "pt"},
    )


def _replace_dir(tmp: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
