#!/usr/bin/env bash
# GPU checks on a machine WITHOUT network that has a CUDA torch and transformers>=5.16,<6.
# Installs offline-wheels/ (made by scripts/prepare_offline_wheels.sh where there is network;
# copy the repository with that folder) into a folder of its own on PYTHONPATH (so it works
# whether the system's torch lives in a venv, conda or the base Python), then runs
# benchmarks/gpu_check.py (under 8 minutes on one GPU) and writes
# benchmarks/results/gpu/<device>.json. vLLM is not among the wheels (far too large): its
# tests run in scripts/gpu_check.sh, on a machine with network.
#
#   scripts/gpu_check_offline.sh [--wheels DIR] [--dry-run] [--cpu]
#     --dry-run  check the machine and the folder, print the install and check commands
#     --cpu      toy sizes on the CPU (to try this script where there is no GPU)
#   PYTHON (python3: the one with torch), SITE (.offline-site), TIMEOUT_S (480) override
#   the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=offline-wheels
DRY=0
CPU=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --cpu) CPU=(--cpu); shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check_offline: unknown argument $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
SITE=${SITE:-.offline-site}
case "$SITE" in /*) ;; *) SITE=$PWD/$SITE ;; esac
TIMEOUT_S=${TIMEOUT_S:-480}
LIST=scripts/offline_wheels.txt
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
export PYTHONPATH="$SITE:$PWD"  # the folder's packages, then this checkout's rlhfless
# fp32 checks are exact only with IEEE fp32 in Triton kernels (TF32 is its default on
# Ampere/Hopper); DeepSpeed compiles nothing at install time (its ops JIT-build if used).
export TRITON_F32_DEFAULT=ieee DS_BUILD_OPS=0
fail() { echo "gpu_check_offline: $*" >&2; exit 1; }
run() { echo "+ $*"; if [ "$DRY" = 0 ]; then "$@"; fi; }

# 1. What this machine has: torch (CUDA unless --cpu) and a transformers this code supports.
"$PY" - "${#CPU[@]}" <<'PYEOF' || fail "this machine cannot run the checks (see above)"
import sys
try:
    import torch
    import transformers
except ImportError as exc:
    sys.exit(f"needs torch and transformers installed: {exc}")
from packaging.version import Version

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
      f"{transformers.__version__}, python {sys.version.split()[0]}")
if not Version("5.16") <= Version(transformers.__version__) < Version("6"):
    sys.exit("needs transformers>=5.16,<6 (the wheel folder does not carry transformers)")
if sys.argv[1] == "0" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible (use --cpu to try the script on the CPU)")
PYEOF

# 2. The folder: complete and unchanged since it was prepared.
[ -f "$WHEELS/SHA256SUMS" ] || fail "no $WHEELS/SHA256SUMS: run scripts/prepare_offline_wheels.sh \
where there is network and copy $WHEELS/ here"
(cd "$WHEELS" && sha256sum --check --quiet SHA256SUMS) || fail "$WHEELS does not match SHA256SUMS"
mapfile -t REQS < <(grep -vE '^\s*(#|$)' "$LIST" | awk '{print $1}')
shopt -s nocaseglob nullglob
for req in "${REQS[@]}"; do
  name=${req%%==*}
  version=${req#*==}
  pattern=${name//-/[-_]}  # wheel names write - as _
  # shellcheck disable=SC2206  # the pattern must glob
  files=("$WHEELS"/$pattern-"$version"[-.]*)
  [ ${#files[@]} -gt 0 ] || fail "$WHEELS has nothing for $req"
done
shopt -u nocaseglob nullglob
echo "wheel folder: $(($(wc -l < "$WHEELS/SHA256SUMS"))) files, all listed requirements present"

# 3. The folder's packages into $SITE, exactly the list (--no-deps: torch, transformers and
#    their dependencies are the machine's). DeepSpeed's sdist is built here against the
#    machine's torch, with the setuptools installed first (no isolated build: it would
#    fetch an unpinned torch, and there is no network anyway).
PIP=("$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --target "$SITE")
SETUPTOOLS=$(grep -E '^setuptools==' "$LIST" | awk '{print $1}')
mapfile -t REST < <(printf '%s\n' "${REQS[@]}" | grep -v '^setuptools==')
run rm -rf "$SITE"
run "${PIP[@]}" "$SETUPTOOLS"
run "${PIP[@]}" --no-build-isolation "${REST[@]}"
run "$PY" -c "import deepspeed, pydantic, accelerate, starlette, torch; \
print('installed: deepspeed', deepspeed.__version__, '| torch', torch.__version__)"

# 4. The checks (they import rlhfless from this checkout).
run timeout "$TIMEOUT_S" "$PY" benchmarks/gpu_check.py --mode offline "${CPU[@]}"
