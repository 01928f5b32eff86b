"""TensorFlow as the input pipeline uses it: on the host only.

TensorFlow runs only the input pipeline here, so its GPUs and TPUs are hidden
from it before it can claim their memory, which stays with JAX. Every data
module takes `tf` from here, so whichever is imported first hides them.
"""

import tensorflow as tf


def _hide_accelerators_from_tf() -> None:
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      pass  # TF already initialised its devices, or has no such kind.


_hide_accelerators_from_tf()
