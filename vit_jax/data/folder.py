"""Image folders: `root/<split>/<class_name>/*.{jpg,jpeg,png}`.

Class names are the sorted subdirectory names of the train split; label `i`
is `class_names[i]`. Files are ordered by (class, file name), so a split's
order, and every slice of it (`train[:90%]`, TFDS slicing syntax), is fixed.

Each split is scanned once per process on first use: every file is decoded
(in parallel) to find unreadable ones and the native image shapes. A bad
file is a ValueError naming it, or, with `config.input.skip_bad_images`, a warning
and the file is left out. So is an image whose header claims more than
`config.input.max_image_pixels` pixels (vit_jax.data.pixel_limit): it is
measured before the test decode, so a decompression bomb is never decoded. The scan costs one decode pass, fine for the small
folders this is meant for; convert large collections to TFDS instead.
"""

import collections.abc
import dataclasses
import functools
import os
import re
import types

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from vit_jax.data import pixel_limit
from vit_jax.data.tf_runtime import tf

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
_LIMIT_SETTING = 'config.input.max_image_pixels'


@dataclasses.dataclass(frozen=True)
class _Scan:
  paths: tuple[str, ...]
  labels: tuple[int, ...]
  shapes: tuple[tuple[int, int, int], ...]  # Native decoded (H, W, C).


def _decode_error(path: str) -> str | None:
  try:
    tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
  except tf.errors.OpError as e:
    # Drop TF's '{{function_node ...}}' prefix and '[Op:...]' suffix.
    return re.sub(r'\{\{.*?\}\}\s*|\s*\[Op:.*$', '', e.message).strip()
  return 'decodes only outside tf.data'


def _within_pixel_limit(paths: list[str], labels: list[int], max_pixels: int,
                        skip_bad_images: bool) -> tuple[list[str], list[int]]:
  """The (paths, labels) whose headers are within `max_pixels`; an image
  over it is an error, or with `skip_bad_images` a warning and left out."""
  kept_paths, kept_labels = [], []
  for path, label in zip(paths, labels):
    try:
      pixel_limit.check_pixel_limit(path, max_pixels, _LIMIT_SETTING)
    except pixel_limit.ImageTooLarge as e:
      if not skip_bad_images:
        raise
      logging.warning('%s; skipping it.', e)
      continue
    kept_paths.append(path)
    kept_labels.append(label)
  return kept_paths, kept_labels


@functools.lru_cache(maxsize=16)
def _scan_split(split_dir: str, class_names: tuple[str, ...],
                skip_bad_images: bool, max_image_pixels: int) -> _Scan:
  """Lists, labels, measures and test-decodes the images of one split
  directory."""
  paths, labels = [], []
  for entry in sorted(os.listdir(split_dir)):
    class_dir = os.path.join(split_dir, entry)
    if not os.path.isdir(class_dir):
      continue
    if entry not in class_names:
      raise ValueError(f'{class_dir}: class {entry!r} is not a class of the '
                       f'train split {class_names}.')
    for file_name in sorted(os.listdir(class_dir)):
      if file_name.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.path.join(class_dir, file_name))
        labels.append(class_names.index(entry))
  if not paths:
    raise ValueError(f'No {"/".join(IMAGE_EXTENSIONS)} images under '
                     f'{split_dir}/<class_name>/.')
  paths, labels = _within_pixel_limit(paths, labels, max_image_pixels,
                                      skip_bad_images)

  def shape(index, path):
    image = tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
    return index, tf.shape(image)

  ds = tf.data.Dataset.from_tensor_slices(paths).enumerate().map(
      shape, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
  shapes = {}
  for indices, batch_shapes in ds.batch(1024).as_numpy_iterator():
    shapes.update(zip(indices.tolist(), map(tuple, batch_shapes.tolist())))
  for index, path in enumerate(paths):
    if index not in shapes:
      message = f'Cannot decode image file {path} ({_decode_error(path)})'
      if not skip_bad_images:
        raise ValueError(f'{message}; set config.input.skip_bad_images=True to '
                         'skip unreadable files.')
      logging.warning('%s; skipping it.', message)
  keep = sorted(shapes)
  return _Scan(tuple(paths[i] for i in keep), tuple(labels[i] for i in keep),
               tuple(shapes[i] for i in keep))


def _split_names(spec: str) -> list[str]:
  """'train[:90%]+extra' -> ['train', 'extra']."""
  return [part.split('[')[0].strip() for part in spec.split('+')]


class _LazySplits(collections.abc.Mapping):
  """Split name -> sizes, scanning a split only when it is looked up."""

  def __init__(self, source: 'FolderSource'):
    self._source = source

  def __getitem__(self, split):
    if split not in self._source.splits:
      raise KeyError(split)
    n = len(self._source.scan(split).paths)
    return types.SimpleNamespace(num_examples=n, shard_lengths=[n])

  def __iter__(self):
    return iter(self._source.splits)

  def __len__(self):
    return len(self._source.splits)


class FolderSource:
  """A `Source` (see sources.py) over an image folder; random access."""

  def __init__(self, root: str, *, train_split: str, channels: int,
               skip_bad_images: bool = False,
               max_image_pixels: int = pixel_limit.DEFAULT_MAX_IMAGE_PIXELS):
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
      raise FileNotFoundError(
          f"Image folder {root} does not exist (config.dataset='folder:"
          f"{root}', expected {root}/<split>/<class_name>/*.jpg).")
    self.name = f'folder:{root}'
    self.root = root
    self.splits = tuple(sorted(
        d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))))
    self._channels = channels
    self._skip_bad_images = skip_bad_images
    self._max_image_pixels = max_image_pixels
    train_dir = self._split_dir(_split_names(train_split)[0])
    self.class_names = tuple(sorted(
        d for d in os.listdir(train_dir)
        if os.path.isdir(os.path.join(train_dir, d))))
    self.image_shape = self._native_shape(train_split)

  def _split_dir(self, split: str) -> str:
    if split not in self.splits:
      raise ValueError(f'Split {split!r} does not exist in image folder '
                       f'{self.root}. Available splits: {list(self.splits)}.')
    return os.path.join(self.root, split)

  def scan(self, split: str) -> _Scan:
    return _scan_split(self._split_dir(split), self.class_names,
                       self._skip_bad_images, self._max_image_pixels)

  def _native_shape(self, spec: str) -> tuple[int | None, int | None, int]:
    shapes = {s for name in _split_names(spec) for s in self.scan(name).shapes}
    channels = max(min(s[2], 3) for s in shapes)  # Alpha is dropped.
    sizes = {s[:2] for s in shapes}
    height, width = sizes.pop() if len(sizes) == 1 else (None, None)
    return height, width, channels

  def _select(self, spec: str) -> tuple[list[str], list[int]]:
    """Paths and labels of a split spec, in order."""
    try:
      instructions = tfds.core.ReadInstruction.from_spec(spec).to_absolute(
          _LazySplits(self))
    except (KeyError, ValueError) as e:
      raise ValueError(f'Split {spec!r} of image folder {self.root}: {e}. '
                       f'Available splits: {list(self.splits)}.') from e
    paths, labels = [], []
    for instruction in instructions:
      scan = self.scan(instruction.splitname)
      part = slice(instruction.from_, instruction.to)
      paths += scan.paths[part]
      labels += scan.labels[part]
    return paths, labels

  def split_size(self, split):
    return len(self._select(split)[0])

  def records(self, split, shard_key=None):
    del shard_key  # Random access; the pipeline shuffles indices instead.
    paths, labels = self._select(split)
    return tf.data.Dataset.from_tensor_slices(
        {'path': paths, 'label': tf.constant(labels, tf.int32)})

  def labels(self, split):
    return np.asarray(self._select(split)[1], np.int64)

  def lookup(self, split):
    paths, labels = self._select(split)
    paths, labels = tf.constant(paths), tf.constant(labels, tf.int32)
    return lambda index: {'path': tf.gather(paths, index),
                          'label': tf.gather(labels, index)}

  def decode(self, record):
    image = tf.io.decode_image(tf.io.read_file(record['path']),
                               channels=self._channels,
                               expand_animations=False)
    image.set_shape([None, None, self._channels])
    return {'image': image, 'label': record['label']}
