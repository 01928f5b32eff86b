#!/usr/bin/env bash
# The GPU benchmark in one command (docs/gpu_benchmark.md): our train step
# against timm's for ViT-B/16 and ViT-L/16, one table, under 8 minutes on an H100.
#
#   bash scripts/gpu_benchmark.sh [--dry_run] [flags of vit_jax.tools.gpu_benchmark]
#   bash scripts/gpu_benchmark.sh --fetch_wheels   # beforehand, where PyPI is reachable
#
# Runs from the repository root with the Python on PATH (python3, else python;
# or $PYTHON) and creates no environment. A GPU image may lack ml-collections,
# which the train step's config needs: then it is installed, offline, from
# wheels/ (ignored by git), which --fetch_wheels fills and which travels with
# the working tree where it is carried along. --dry_run runs the same code on
# the CPU with a tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(command -v python3 || command -v python || true)}
if [ -z "$PY" ]; then
  echo "error: no python3 or python on PATH; set PYTHON=/path/to/python" >&2
  exit 1
fi
WHEELS=wheels
# Pure-Python packages the benchmark imports that a GPU image may lack.
NEEDED=(ml-collections==1.1.0)

for arg in "$@"; do
  if [ "$arg" = --fetch_wheels ]; then
    "$PY" -m pip download --no-deps --only-binary=:all: -d "$WHEELS" "${NEEDED[@]}"
    echo "wheels in $WHEELS/: $(ls "$WHEELS" | tr '\n' ' ')"
    exit 0
  fi
done

if ! "$PY" -c 'import ml_collections' 2>/dev/null; then
  echo "ml_collections is not importable by $PY: installing it from $WHEELS/" >&2
  if ! ls "$WHEELS"/ml_collections-*.whl >/dev/null 2>&1; then
    echo "error: $WHEELS/ holds no ml_collections wheel. On a machine that" \
         "reaches PyPI run 'bash scripts/gpu_benchmark.sh --fetch_wheels'," \
         "then bring $WHEELS/ along (the device tool: carry=[\"$WHEELS\"])," \
         "or install ml-collections==1.1.0 into $PY yourself." >&2
    exit 1
  fi
  install=("$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS")
  if ! "${install[@]}" ml-collections; then
    site="${TMPDIR:-/tmp}/vit_jax_gpu_benchmark_site"  # Its site is read-only.
    echo "pip could not install into $PY's packages; trying $site" >&2
    if ! "${install[@]}" --target "$site" ml-collections; then
      echo "error: ml-collections did not install from $WHEELS/ (pip's" \
           "message is above); install ml-collections==1.1.0 into $PY by" \
           "hand, or point PYTHON at a Python that has it." >&2
      exit 1
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ! error=$("$PY" -c 'import ml_collections' 2>&1); then
    echo "error: ml-collections installed but does not import: ${error##*$'\n'}" \
         "(it needs absl-py and PyYAML: put their wheels in $WHEELS/ too)" >&2
    exit 1
  fi
fi

for arg in "$@"; do
  case "$arg" in
    --dry_run|--dry_run=true|--dry_run=True|--dry_run=1) export JAX_PLATFORMS=cpu ;;
  esac
done
export PYTHONUNBUFFERED=1  # Progress lines as they happen.
exec "$PY" -m vit_jax.tools.gpu_benchmark "$@"
