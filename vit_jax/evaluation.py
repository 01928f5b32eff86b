"""Evaluation over whole splits: the metric names and the loop over batches.

Every example of a split is counted exactly once over all devices and
processes (the last batches are padded and masked), so the numbers do not
depend on the batch size or the device count. The trainer and the evaluate
tool call the same `evaluate` with the same compiled eval step.
"""

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from vit_jax import data
from vit_jax import parallel


def split_name(split: str) -> str:
  """A metric-name-safe split name: 'train[98%:]' -> 'train_98pct'."""
  return re.sub(r'[^A-Za-z0-9]+', '_', split.replace('%', 'pct')).strip('_')


def metric_names(config: ml_collections.ConfigDict) -> list[str]:
  """Every name `evaluate` logs for the config's eval splits (and EMA)."""
  tags = ('', '_ema') if config.train.ema_decay > 0 else ('',)
  return [f'eval_{split_name(split)}{tag}_{metric}'
          for split in data.eval_splits(config) for tag in tags
          for metric in ('top1', 'top5', 'loss')]


def evaluate(eval_step: Callable[[Any, Any], Any], params: Any,
             config: ml_collections.ConfigDict, split: str,
             mesh: jax.sharding.Mesh, ema_params: Any = None) -> dict[str, float]:
  """Top-1, top-5 and loss over every example of `split` (padding masked out).

  Names are `eval_<split>_top1` etc. With `ema_params`, each batch is read once
  and scored by both parameter sets; the EMA's names are `eval_<split>_ema_*`.
  """
  tagged = {'': params} if ema_params is None else {'': params, '_ema': ema_params}
  sums = dict.fromkeys(tagged)
  local_batch = parallel.local_batch_size(config.eval.batch_size)
  for local in data.eval_iterator(
      config, split, local_batch_size=local_batch,
      process_index=jax.process_index(), process_count=jax.process_count()):
    batch = parallel.to_global_batch(local, mesh)
    for tag, tree in tagged.items():
      out = eval_step(tree, batch)
      sums[tag] = out if sums[tag] is None else jax.tree.map(jnp.add, sums[tag], out)
  if sums[''] is None or float(sums['']['count']) == 0:
    # get_dataset_info refuses an empty split before anything compiles; this
    # is the split that read nothing anyway (e.g. files removed since).
    raise ValueError(f'evaluation of split {split!r} of {config.dataset!r} '
                     'counted no examples; check config.eval.splits and the '
                     'data under config.input.data_dir')
  results = {}
  for tag, tag_sums in jax.device_get(sums).items():
    count = float(tag_sums['count'])
    name = split_name(split) + tag
    results.update({f'eval_{name}_top1': float(tag_sums['top1']) / count,
                    f'eval_{name}_top5': float(tag_sums['top5']) / count,
                    f'eval_{name}_loss': float(tag_sums['loss']) / count,
                    f'eval_{name}_count': count})
  return results
