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

# Python 3.12 or newer gets today's jax (0.12 needs 3.12); 3.11 gets the older pins
# (requirements.txt). PYTHON overrides; an existing .venv keeps its Python.
find_python() {
  local candidate
  for candidate in python3.12 python3.13 \
      "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[23]*/bin/python3.1[23]; do
    if command -v "$candidate" > /dev/null 2>&1 \
        && "$candidate" -c 'import sys, venv; assert sys.version_info >= (3, 12)' \
        2> /dev/null; then
      echo "$candidate"
      return
    fi
  done
  echo "note: no Python 3.12+ found; using python3 and the jax 0.10.2 pins" >&2
  echo python3
}
if [ ! -x .venv/bin/python ]; then
  PY=${PYTHON:-$(find_python)}
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q -U pip
.venv/bin/pip install -q -r requirements.txt -r requirements-dev.txt
.venv/bin/pip install -q --no-deps -e .
mkdir -p runs  # Where the README's commands write (ignored by git).
.venv/bin/python -c "import jax, flax, optax, orbax.checkpoint, tensorflow_datasets; import sys; print('vit_jax setup ok: Python', sys.version.split()[0], 'jax', jax.__version__, 'devices', jax.devices())"
