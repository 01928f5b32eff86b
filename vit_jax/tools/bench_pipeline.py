"""The input side of `vit_jax.tools.benchmark --pipeline`.

Times `data.train_iterator` alone (host numpy batches, nothing sent to a
device), and can write an image folder of random JPEGs to time decoding from
files, as a user's own folder of photos would be read.
"""

import contextlib
import os
import tempfile
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np
from PIL import Image

from vit_jax import data

NUM_CLASSES = 10
# Photo-like sizes (ImageNet's average is about 400x350), varied so that the
# resize does real work per image.
_JPEG_SIZES = ((320, 240), (400, 300), (375, 500), (256, 256))


def _photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
  """Smooth colour blobs plus grain: compresses like a photo, not like noise."""
  coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), np.uint8)
  image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
  grain = rng.normal(0, 8, (height, width, 3))
  return Image.fromarray(np.clip(np.asarray(image) + grain, 0, 255).astype(np.uint8))


def write_jpeg_folder(root: str, count: int, seed: int = 0) -> None:
  """`count` train JPEGs in NUM_CLASSES classes, and a small test split."""
  rng = np.random.default_rng(seed)
  for split, n in (('train', count), ('test', NUM_CLASSES)):
    for i in range(n):
      class_dir = os.path.join(root, split, f'class_{i % NUM_CLASSES}')
      os.makedirs(class_dir, exist_ok=True)
      width, height = _JPEG_SIZES[i % len(_JPEG_SIZES)]
      _photo(rng, width, height).save(os.path.join(class_dir, f'{i:06d}.jpg'),
                                      quality=90)


@contextlib.contextmanager
def jpeg_folder_config(config: ml_collections.ConfigDict,
                       count: int) -> Iterator[ml_collections.ConfigDict]:
  """A copy of `config` reading `count` generated JPEGs (deleted on exit).

  The cache is off, so every batch decodes its files, as a folder too large
  to hold in memory would be read.
  """
  with tempfile.TemporaryDirectory(prefix='vit_bench_jpegs_') as root:
    write_jpeg_folder(root, count, seed=int(config.seed))
    config = ml_collections.ConfigDict(config)  # A copy, still locked.
    config.dataset = f'folder:{root}'
    config.input.train_split, config.eval.splits = 'train', 'test'
    config.input.cache = False
    yield config


def build_pipeline(config: ml_collections.ConfigDict, batch: int
                   ) -> tuple[Callable[[int], int], int, dict[str, Any]]:
  """run(n) that takes >= n batches (returns how many), classes, facts.

  A run takes at least 8x the prefetch depth, so the batches tf.data buffered
  while another runner was being timed add little to a round.
  """
  info = data.get_dataset_info(config)
  iterator = data.train_iterator(config, local_batch_size=batch)
  min_batches = 8 * (int(config.input.prefetch) + 1)

  def run(n: int) -> int:
    n = max(n, min_batches)
    for _ in range(n):
      next(iterator)
    return n

  dataset = config.dataset
  if dataset.startswith('folder:'):
    dataset = f'folder of {info.num_examples[config.input.train_split]} JPEGs'
  return run, info.num_classes, {
      'pipeline_dataset': dataset, 'pipeline_cache': bool(config.input.cache),
      'pipeline_train_crop': config.pp.train_crop}
