#!/usr/bin/env bash
# Sets up a fresh machine: Debian's offline Fashion-MNIST, a venv in .venv with the
# pinned requirements, and this package installed editable. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
  else
    echo "note: install Fashion-MNIST with 'sudo apt-get install dataset-fashion-mnist'" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q -U pip
.venv/bin/pip install -q -r requirements.txt -r requirements-dev.txt
.venv/bin/pip install -q --no-deps -e .
mkdir -p runs  # Where the README's commands write (ignored by git).
.venv/bin/python -c "import jax, flax, optax, orbax.checkpoint, tensorflow_datasets; print('vit_jax setup ok: jax', jax.__version__, 'devices', jax.devices())"
