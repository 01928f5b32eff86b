"""Input pipeline: config -> host-local numpy batches.

    check_config(config)                     # the input keys, no IO
    info = get_dataset_info(config)          # sizes, classes; fails early
    batches = train_iterator(config, local_batch_size=B, process_index=p,
                             process_count=P, start_step=step)
    for batch in eval_iterator(config, 'test', local_batch_size=B, ...): ...

See pipeline.py for the guarantees (determinism, exact resume, process-count
independence) and order.py for how they are kept.

TensorFlow runs the input pipeline and nothing else (tf_runtime.py hides the
accelerators from it). Importing this package does not import it: the checks
are TF-free, and the names that need TensorFlow load their module on first
use, so code that only builds and times models (the benchmark on a machine
without TensorFlow) can import what the trainer imports.
"""

import importlib
from typing import Any

from vit_jax.data.checks import check_config
from vit_jax.data.checks import eval_splits

# Name -> the module (of this package) that defines it and imports TensorFlow.
_TF_BACKED = {
    'DatasetInfo': 'info',
    'get_dataset_info': 'info',
    'num_eval_batches': 'info',
    'train_iterator': 'pipeline',
    'eval_iterator': 'pipeline',
}

__all__ = ['check_config', 'eval_splits', *_TF_BACKED]


def __getattr__(name: str) -> Any:
  if name in _TF_BACKED:
    module = importlib.import_module(f'{__name__}.{_TF_BACKED[name]}')
    return getattr(module, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
