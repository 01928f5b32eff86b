"""Input pipeline: config -> host-local numpy batches.

    info = get_dataset_info(config)          # sizes, classes; fails early
    batches = train_iterator(config, local_batch_size=B, process_index=p,
                             process_count=P, start_step=step)
    for batch in eval_iterator(config, 'test', local_batch_size=B, ...): ...

See pipeline.py for the guarantees (determinism, exact resume, process-count
independence) and order.py for how they are kept.

TensorFlow only runs the input pipeline here, so importing this package hides
GPUs and TPUs from it; their memory stays with JAX.
"""

import tensorflow as tf


def _hide_accelerators_from_tf() -> None:
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      pass  # TF already initialised its devices, or has no such kind.


_hide_accelerators_from_tf()

# pylint: disable=g-import-not-at-top,wrong-import-position
from vit_jax.data.info import DatasetInfo
from vit_jax.data.info import check_config
from vit_jax.data.info import get_dataset_info
from vit_jax.data.info import num_eval_batches
from vit_jax.data.pipeline import eval_iterator
from vit_jax.data.pipeline import train_iterator

__all__ = [
    'DatasetInfo',
    'check_config',
    'get_dataset_info',
    'train_iterator',
    'eval_iterator',
    'num_eval_batches',
]
