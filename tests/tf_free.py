"""Runs a module as `python -m` would, with TensorFlow, TFDS and clu not installed.

    python tests/tf_free.py vit_jax.tools.benchmark --model=ViT-test_4 ...
    python tests/tf_free.py --hide_too=torch,timm vit_jax.tools.gpu_benchmark ...

What a GPU machine whose Python has jax, flax, optax and orbax but none of the
input-pipeline libraries can run. The path finder finds nothing for them, as
when they are absent: `import tensorflow` raises ModuleNotFoundError and a probe
(importlib.util.find_spec, as etils.epath and torch make) returns None.
"""

import importlib.machinery
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCKED = ('tensorflow', 'tensorflow_datasets', 'clu', 'tensorboard', 'keras',
           'tf_keras')


_HIDDEN = set(BLOCKED)


class _HidingPathFinder(importlib.machinery.PathFinder):

  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name.split('.')[0] in _HIDDEN:
      return None
    return super().find_spec(name, path, target)


if __name__ == '__main__':
  sys.meta_path = [_HidingPathFinder if f is importlib.machinery.PathFinder
                   else f for f in sys.meta_path]
  sys.path[0] = ROOT  # As `python -m` from the repository root has it.
  args = sys.argv[1:]
  if args and args[0].startswith('--hide_too='):  # More packages to hide.
    _HIDDEN.update(args.pop(0).split('=', 1)[1].split(','))
  module = args[0]
  sys.argv = [module] + args[1:]
  runpy.run_module(module, run_name='__main__', alter_sys=True)
