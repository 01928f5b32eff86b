"""What the trainer needs to know about the data before it builds a model.

`get_dataset_info` opens the dataset and sizes every split the config names.
It is cheap (reads metadata; prepares an offline dataset or scans an image
folder only the first time) and raises the data errors — unknown dataset,
data not prepared, unknown split — before any model compiles. The input
keys themselves are checked by vit_jax.data.checks, without touching the data.
"""

import dataclasses
import math

from vit_jax.config_checks import ConfigError
from vit_jax.data import sources
from vit_jax.data.checks import eval_splits


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Facts about the configured dataset.

  Attributes:
    name: `config.dataset`.
    num_classes: number of labels; labels are in [0, num_classes).
    class_names: the label names, index = label.
    num_examples: examples in `config.input.train_split` and each eval split, keyed
      by the split spec as written in the config (after slicing, so
      `'train[:98%]'` of Fashion-MNIST is 58,800).
    image_shape: native (H, W, C) of the stored images; H and W are None if
      images differ in size.
  """
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  num_examples: dict[str, int]
  image_shape: tuple[int | None, int | None, int]


def get_dataset_info(config) -> DatasetInfo:
  """Opens `config.dataset` and sizes the train and eval splits.

  The config's input keys passed `check_config`.

  Raises:
    ValueError: unknown dataset name or split (the message lists the
      available splits); ConfigError: a split that holds no examples.
    FileNotFoundError: the dataset is known but its data is missing (the
      message says how to get it).
  """
  source = sources.open_source(config)
  keys = {config.input.train_split: 'config.input.train_split'}
  for split in eval_splits(config):
    keys.setdefault(split, 'config.eval.splits')
  num_examples = {split: source.split_size(split) for split in keys}
  for split, key in keys.items():
    if num_examples[split] == 0:  # Found before a step compiles, not after.
      raise ConfigError(
          f'{key}: split {split!r} of {config.dataset!r} holds no examples '
          f'(the splits hold {_sizes(source, split)}); pick a slice that '
          "selects some, e.g. 'test[:50%]'.")
  return DatasetInfo(
      name=config.dataset,
      num_classes=len(source.class_names),
      class_names=tuple(source.class_names),
      num_examples=num_examples,
      image_shape=tuple(source.image_shape))


def _sizes(source: sources.Source, split: str) -> str:
  """'train: 1297, test: 500': the whole splits, for an empty slice's message."""
  names = dict.fromkeys([split.split('[')[0], 'train', 'test', 'validation'])
  found = []
  for name in names:
    try:
      found.append(f'{name}: {source.split_size(name)}')
    except (ValueError, FileNotFoundError):
      continue
  return ', '.join(found) or 'no split this config names'



def num_eval_batches(info_or_config, split: str,
                     global_batch_size: int) -> int:
  """Batches `eval_iterator` yields on every process: ceil(N / global batch).

  Args:
    info_or_config: a `DatasetInfo` whose `num_examples` has `split`, or a
      config (then the split is opened and sized).
    split: split spec, e.g. 'test'.
    global_batch_size: local batch size times process count.
  """
  if isinstance(info_or_config, DatasetInfo):
    if split not in info_or_config.num_examples:
      raise KeyError(f'Split {split!r} was not sized by get_dataset_info; it '
                     f'has {sorted(info_or_config.num_examples)}.')
    num_examples = info_or_config.num_examples[split]
  else:
    num_examples = sources.open_source(info_or_config).split_size(split)
  return math.ceil(num_examples / global_batch_size)
