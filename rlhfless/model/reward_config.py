"""Is `reward.model.path` a reward model? Read from its config.json alone (no ML library), so
`rlhfless validate` and `run` refuse a wrong directory before anything starts.

A reward model here is a causal decoder with a sequence-classification head and one label
(`*ForSequenceClassification`, `num_labels` 1): its logit at a sequence's last token is the
reward. The scorer reads the hidden state the shared-prefix pass leaves there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIELD = "spec.reward.model.path"
# Padded tokens one scorer forward may hold (rows × the longest prompt + response in them): a
# group larger than this is scored in parts, each part running the prompt once. The memory
# plan sizes the scorer's largest forward with it.
DEFAULT_TOKEN_BUDGET = 32768
CLASSIFIER_SUFFIX = "ForSequenceClassification"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def num_labels(config: dict[str, Any]) -> int:
    """As transformers counts them: `id2label` when the file has it, else `num_labels`,
    else its default of 2."""
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    value = config.get("num_labels", 2)
    return value if isinstance(value, int) else 2


def read_config(path: str | Path) -> dict[str, Any] | None:
    """The reward model's config.json as a dict (None when it cannot be read)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) else None


def reward_model_problem(path: str | Path) -> str | None:
    """What keeps `path` from being a reward model directory, or None."""
    directory = Path(path)
    if not directory.exists():
        return f"{path} does not exist on this machine"
    if not directory.is_dir():
        return f"{path} is not a directory (a Hugging Face model directory is expected)"
    config_file = directory / "config.json"
    if not config_file.is_file():
        return f"{path} holds no config.json (not a Hugging Face model directory)"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{config_file.name} in {path} cannot be read: {exc}"
    if not isinstance(config, dict):
        return f"{config_file.name} in {path} is not a JSON object"
    architectures = config.get("architectures") or []
    if not any(isinstance(a, str) and a.endswith(CLASSIFIER_SUFFIX) for a in architectures):
        shown = ", ".join(map(str, architectures)) or "none"
        return (f"{path} is not a sequence-classification model (architectures: {shown}; "
                f"a reward model is a *{CLASSIFIER_SUFFIX} with one label)")
    labels = num_labels(config)
    if labels != 1:
        return (f"{path} has {labels} labels; a reward model has one (num_labels 1): its "
                "logit is the reward")
    if not any(next(directory.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        return f"{path} holds no weights (*.safetensors or *.bin)"
    return None


def reward_model_errors(reward: Any) -> list[str]:
    """`spec.reward.model.path: ...` when the job scores with a reward model that is not one
    (reads files: never called by the operator)."""
    model = getattr(reward, "model", None)
    if model is None:
        return []
    problem = reward_model_problem(model.path)
    return [f"{FIELD}: {problem}"] if problem else []
