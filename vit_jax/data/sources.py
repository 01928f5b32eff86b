"""Where examples come from: `config.dataset` -> a `Source`.

A source hands out *undecoded records* (serialized tf.Examples, or file paths)
cheaply, and decodes one record into `{'image': uint8 [H, W, C], 'label':
int32 []}` on demand. Keeping the two apart lets the pipeline decide which
process decodes what after the cheap records are ordered and shared out.

  * TFDS names: any prepared TFDS dataset, plus this project's offline
    builders `fashion_mnist` (Debian's files) and `digits` (scikit-learn),
    which are prepared on first use. Records are read straight from the
    prepared TFRecord shards, honouring TFDS split slicing (`train[:98%]`).
    With `config.input.tfds_reader='as_dataset'` records come from the builder's own
    `as_dataset` instead: any TFDS file format, and `tfds.testing.mock_data`
    (which fakes `as_dataset`, not the shards) works, at the cost of reading a
    split in one fixed order (the window shuffle still applies).
  * `folder:/root`: see `folder.py`.

Errors for a missing dataset or split are raised here, when the source is
opened or a split is sized, so they surface before any model compiles.
"""

import contextlib
import difflib
import fcntl
import os
from collections.abc import Callable
from typing import Protocol

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from vit_jax.data import digits
from vit_jax.data import fashion_mnist
from vit_jax.data import folder
from vit_jax.data import pixel_limit
from vit_jax.data.tf_runtime import tf

Record = dict[str, tf.Tensor]


OFFLINE_BUILDERS = {
    'fashion_mnist': fashion_mnist.FashionMnist,
    'digits': digits.Digits,
}
_HOW_TO_GET = {
    'fashion_mnist': (
        'Offline: `apt-get install dataset-fashion-mnist` (idx files under '
        f'{fashion_mnist.LOCAL_DIR}); online: the normal TFDS download runs '
        'automatically.'),
    'digits': 'It is built from scikit-learn: `pip install scikit-learn`.',
}


class Source(Protocol):
  """What the pipeline needs from a dataset (see module docstring)."""
  name: str
  class_names: tuple[str, ...]
  image_shape: tuple[int | None, int | None, int]

  def split_size(self, split: str) -> int:
    """Examples in a split spec; ValueError naming the available splits."""

  def records(self, split: str,
              shard_key: tf.Tensor | None = None) -> tf.data.Dataset:
    """Undecoded records of a split: a fixed order, or with `shard_key`
    (int64 [2]) its shards in a key-dependent order. Traceable inside
    `tf.data` functions."""

  def lookup(self, split: str) -> Callable[[tf.Tensor], Record] | None:
    """Random access `index -> record`, or None if the source streams."""

  def decode(self, record: Record) -> Record:
    """`{'image': uint8 [H, W, C], 'label': int32 []}` from a record."""

  def labels(self, split: str) -> np.ndarray:
    """Every label of a split in `records(split)`'s fixed order, without
    decoding an image (class counts, checked before anything compiles)."""


class TfdsSource:
  """A prepared TFDS dataset, read shard by shard."""

  def __init__(self, name: str, builder: tfds.core.DatasetBuilder):
    self.name = name
    self._builder = builder
    info = builder.info
    keys = info.supervised_keys
    if not (keys and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
      keys = ('image', 'label')
    self._image_key, self._label_key = keys
    features = info.features
    image = features[self._image_key] if self._image_key in features else None
    label = features[self._label_key] if self._label_key in features else None
    if not (isinstance(image, tfds.features.Image) and
            isinstance(label, tfds.features.ClassLabel)):
      raise ValueError(
          f'Dataset {name!r} is not an image classification dataset: need an '
          f'Image feature {self._image_key!r} and a ClassLabel '
          f'{self._label_key!r}; its features are {info.features}.')
    self._image_feature = image
    self._check_file_format()
    self.class_names = tuple(label.names)
    self.image_shape = tuple(image.shape)

  def _check_file_format(self) -> None:
    file_format = getattr(self._builder.info.file_format, 'value', 'tfrecord')
    if file_format != 'tfrecord':
      raise ValueError(
          f'Dataset {self.name!r} is stored as {file_format}; this pipeline reads '
          "TFRecord shards. Prepare it with the default file format, or set "
          "config.input.tfds_reader='as_dataset'.")

  def split_size(self, split: str) -> int:
    return self._split_info(split).num_examples

  def _split_info(self, split: str):
    splits = self._builder.info.splits
    try:
      return splits[split]
    except (KeyError, ValueError) as e:
      raise ValueError(
          f'Split {split!r} of dataset {self.name!r} is not available ({e}). '
          f'Available splits: {sorted(splits.keys())}; slices such as '
          "'train[:98%]' or 'train[-5000:]' select parts of one.") from e

  def records(self, split, shard_key=None):
    shards = [(f.filename, f.skip,
               f.take if f.take >= 0 else f.examples_in_shard - f.skip)
              for f in self._split_info(split).file_instructions]
    if not shards:  # An empty slice.
      return tf.data.Dataset.from_tensors(
          {'serialized': tf.constant('')}).take(0)
    files, skips, takes = (tf.constant(list(c)) for c in zip(*shards))
    order = tf.range(len(shards), dtype=tf.int64)
    if shard_key is not None:
      order = tf.random.experimental.stateless_shuffle(order, shard_key)

    def read(i):
      return tf.data.TFRecordDataset(files[i]).skip(
          tf.cast(skips[i], tf.int64)).take(tf.cast(takes[i], tf.int64))

    cycle = 1 if shard_key is None else min(16, len(shards))
    ds = tf.data.Dataset.from_tensor_slices(order).interleave(
        read, cycle_length=cycle, block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.map(lambda serialized: {'serialized': serialized})

  def lookup(self, split):
    del split
    return None

  def labels(self, split):
    spec = {self._label_key: tf.io.FixedLenFeature([], tf.int64)}
    ds = self.records(split).map(lambda r: r['serialized']).batch(4096).map(
        lambda s: tf.io.parse_example(s, spec)[self._label_key])
    return np.concatenate([np.zeros(0, np.int64), *ds.as_numpy_iterator()])

  def decode(self, record):
    example = self._builder.info.features.deserialize_example(
        record['serialized'],
        decoders={self._image_key: tfds.decode.SkipDecoding()})
    image = self._image_feature.decode_example(example[self._image_key])
    return {'image': image,
            'label': tf.cast(example[self._label_key], tf.int32)}


class TfdsAsDatasetSource(TfdsSource):
  """A TFDS dataset read through `builder.as_dataset` (config.input.tfds_reader).

  Records are `{'image': encoded bytes, 'label': int64}` in the builder's own
  order; `shard_key` is ignored, so streamed training shuffles only within the
  window. Split sizes come from the dataset's cardinality, which TFDS (and
  `tfds.testing.mock_data`) always know.
  """

  def _check_file_format(self) -> None:
    pass  # as_dataset reads every format TFDS writes.

  def _as_dataset(self, split: str) -> tf.data.Dataset:
    try:
      # Only image (left encoded) and label are read from each example.
      keys = {self._image_key: True, self._label_key: True}
      return self._builder.as_dataset(
          split=split, shuffle_files=False,
          decoders=tfds.decode.PartialDecoding(
              keys, decoders={self._image_key: tfds.decode.SkipDecoding()}))
    except AssertionError as e:  # TFDS's "could not find data" check.
      raise FileNotFoundError(
          f'Dataset {self.name!r} is not prepared ({e}). Prepare it once where '
          f'the network is reachable (`tfds build {self.name}`), or set '
          'config.input.data_dir to a directory that holds it.') from e
    except (KeyError, ValueError) as e:
      raise ValueError(
          f'Split {split!r} of dataset {self.name!r} is not available ({e}). '
          f'Available splits: {sorted(self._builder.info.splits.keys())}.') from e

  def split_size(self, split: str) -> int:
    size = int(self._as_dataset(split).cardinality())
    if size < 0:
      raise ValueError(f'Split {split!r} of dataset {self.name!r} has no known '
                       "size; use config.input.tfds_reader='shards'.")
    return size

  def records(self, split, shard_key=None):
    del shard_key  # One fixed order; see the class docstring.
    image_key, label_key = self._image_key, self._label_key
    return self._as_dataset(split).map(
        lambda ex: {'image': ex[image_key], 'label': ex[label_key]})

  def labels(self, split):
    ds = self.records(split).map(lambda r: r['label']).batch(4096)
    return np.concatenate([np.zeros(0, np.int64), *ds.as_numpy_iterator()])

  def decode(self, record):
    return {'image': self._image_feature.decode_example(record['image']),
            'label': tf.cast(record['label'], tf.int32)}


@contextlib.contextmanager
def _file_lock(path: str):
  """Serialises dataset preparation between processes on one machine."""
  if '://' in path:  # Remote storage: no flock; prepare once beforehand.
    yield
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _offline_builder(name: str,
                     data_dir: str | None) -> tfds.core.DatasetBuilder:
  """An offline builder, prepared (once, under a lock) if it is not yet."""
  cls = OFFLINE_BUILDERS[name]
  builder = cls(data_dir=data_dir)
  if builder.is_prepared():
    return builder
  root = os.fspath(builder.data_path.parent.parent)
  with _file_lock(os.path.join(root, f'.{name}.prepare.lock')):
    builder = cls(data_dir=data_dir)  # Another process may have finished.
    if not builder.is_prepared():
      logging.info('Preparing dataset %r under %s.', name, root)
      try:
        builder.download_and_prepare()
      except Exception as e:  # pylint: disable=broad-except
        raise FileNotFoundError(
            f'Dataset {name!r} is not prepared under {root} and preparing it '
            f'failed: {e!r}. {_HOW_TO_GET[name]} Or set config.input.data_dir to a '
            'directory that holds it.') from e
  return cls(data_dir=data_dir)


def _tfds_builder(name: str, data_dir: str | None,
                  check_prepared: bool = True) -> tfds.core.DatasetBuilder:
  """The builder of a prepared, registered TFDS dataset (never downloads)."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    # Not TFDS's own message: it lists every registered dataset (~500 lines).
    raise ValueError(
        f'config.dataset: unknown dataset {name!r}: not a TFDS dataset name, '
        f'not one of the offline datasets {sorted(OFFLINE_BUILDERS)}, and not '
        f"'folder:/path/to/root'.{_closest_names(name)}") from None
  if check_prepared and not builder.is_prepared():
    flag = f' --data_dir={data_dir}' if data_dir else ''
    raise FileNotFoundError(
        f'Dataset {name!r} is not prepared (looked in {builder.data_dir}). '
        f'Prepare it once where the network is reachable (`tfds build {name}'
        f'{flag}`; some datasets need a manual download, see their TFDS '
        'page), or set config.input.data_dir to a directory that holds it.')
  return builder


def _closest_names(name: str) -> str:
  """" Did you mean 'mnist' or 'fashion_mnist'?" (or '' if nothing is close)."""
  base = name.split(':')[0].split('/')[0]  # 'cifar10:3.0.2' -> 'cifar10'
  known = sorted(set(tfds.list_builders()) | set(OFFLINE_BUILDERS))
  matches = difflib.get_close_matches(base, known, n=4, cutoff=0.6)
  return (' Did you mean ' + ' or '.join(repr(m) for m in matches) + '?'
          if matches else '')


def open_source(config) -> Source:
  """The source `config.dataset` names (see module docstring)."""
  name = config.dataset
  if name.startswith('folder:'):
    return folder.FolderSource(
        name[len('folder:'):], train_split=config.input.train_split,
        channels=config.input.channels,
        skip_bad_images=config.input.get('skip_bad_images', False),
        max_image_pixels=config.input.get(
            'max_image_pixels', pixel_limit.DEFAULT_MAX_IMAGE_PIXELS))
  # .get: configs saved before the key existed read their shards.
  reader = config.input.get('tfds_reader', 'shards')
  if name in OFFLINE_BUILDERS:
    builder = _offline_builder(name, config.input.data_dir)
  else:  # as_dataset reports a missing dataset itself (and mock_data fakes it).
    builder = _tfds_builder(name, config.input.data_dir,
                            check_prepared=reader == 'shards')
  if reader == 'as_dataset':
    return TfdsAsDatasetSource(name, builder)
  return TfdsSource(name, builder)
