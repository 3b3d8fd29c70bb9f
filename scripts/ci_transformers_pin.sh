#!/usr/bin/env bash
# CI: the model and training tests again under the transformers release of the GPU image
# (requirements-gpu.txt: vLLM caps it below the one pyproject.toml resolves to here). Cheap by
# design: .venv (torch, the package, pytest) is reused and only the pinned transformers wheel
# is laid over it on PYTHONPATH, so nothing else is downloaded or installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PIN=$(grep -E '^transformers==' requirements-gpu.txt)
OVERLAY=.venv-transformers-pin
if [ "$(cat "$OVERLAY/.pin" 2>/dev/null)" != "$PIN" ]; then
  rm -rf "$OVERLAY"
  .venv/bin/pip install -q --disable-pip-version-check --no-deps --target "$OVERLAY" "$PIN"
  echo "$PIN" > "$OVERLAY/.pin"
fi
export PYTHONPATH="$PWD/$OVERLAY${PYTHONPATH:+:$PYTHONPATH}"
found=$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')
[ "transformers==$found" = "$PIN" ] || { echo "overlay not in effect: $found" >&2; exit 1; }
echo "model/train tests under $PIN"
# The tests whose code calls into transformers' modelling (caches, checkpointing, loading).
.venv/bin/python -m pytest -q -p no:cacheprovider tests/test_checkpointing.py \
  tests/test_model_tiny.py tests/test_train_update.py tests/test_export.py
