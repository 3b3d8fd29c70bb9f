#!/usr/bin/env bash
# Download what scripts/gpu_check_offline.sh installs (scripts/offline_wheels.txt) into
# offline-wheels/ (git-ignored), for a GPU machine that cannot reach a package index.
# Copy the repository (with offline-wheels/) to that machine. Needs network here, not there.
#
#   scripts/prepare_offline_wheels.sh [DEST]
#   PY_VERSIONS="3.11 3.12 3.13" ARCHS="x86_64 aarch64" scripts/prepare_offline_wheels.sh
#
# Binary wheels are fetched for every listed Python version and CPU architecture; the folder must stay
# under MAX_MB (60) in all. SHA256SUMS lists every file; the offline script checks it.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-offline-wheels}
PY_VERSIONS=${PY_VERSIONS:-"3.11 3.12 3.13 3.14"}
ARCHS=${ARCHS:-"x86_64 aarch64"}
MAX_MB=${MAX_MB:-60}
PIP=${PIP:-.venv/bin/pip}  # its environment has torch: DeepSpeed's sdist metadata needs it
LIST=scripts/offline_wheels.txt

rm -rf "$DEST"
mkdir -p "$DEST"
fetch() { "$PIP" download -q --disable-pip-version-check --no-deps -d "$DEST" "$@"; }
while read -r req kind; do
  case "$req" in ''|'#'*) continue ;; esac
  case "$kind" in
    pure) fetch --only-binary=:all: "$req" ;;
    sdist) fetch --no-binary=:all: --no-build-isolation "$req" ;;
    binary)
      for py in $PY_VERSIONS; do
        for arch in $ARCHS; do
          # glibc 2.28 down to 2.12: whichever the package publishes
          fetch --only-binary=:all: --python-version "$py" --platform "manylinux_2_28_$arch" \
            --platform "manylinux2014_$arch" --platform "manylinux2010_$arch" "$req"
        done
      done ;;
    *) echo "prepare_offline_wheels: $LIST: unknown kind '$kind' for $req" >&2; exit 2 ;;
  esac
done < "$LIST"
(cd "$DEST" && sha256sum -- * > SHA256SUMS)
mb=$(du -sm "$DEST" | cut -f1)
echo "prepare_offline_wheels: $(($(wc -l < "$DEST/SHA256SUMS"))) files, ${mb} MB in $DEST"
if [ "$mb" -gt "$MAX_MB" ]; then
  echo "prepare_offline_wheels: over the ${MAX_MB} MB limit" >&2
  exit 1
fi
