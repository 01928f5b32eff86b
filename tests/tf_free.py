"""Runs a module as `python -m` would, with TensorFlow, TFDS and clu unimportable.

    python tests/tf_free.py vit_jax.tools.benchmark --model=ViT-test_4 ...

What a GPU machine whose Python has jax, flax, optax and orbax but none of the
input-pipeline libraries can run: any import of them fails here, loudly.
"""

import importlib.abc
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCKED = ('tensorflow', 'tensorflow_datasets', 'clu', 'tensorboard', 'keras',
           'tf_keras')


class _Blocker(importlib.abc.MetaPathFinder):

  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ImportError(f'{name} is not installed here (a TF-free run)')
    return None


if __name__ == '__main__':
  sys.meta_path.insert(0, _Blocker())
  sys.path[0] = ROOT  # As `python -m` from the repository root has it.
  module = sys.argv[1]
  sys.argv = [module] + sys.argv[2:]
  runpy.run_module(module, run_name='__main__', alter_sys=True)
