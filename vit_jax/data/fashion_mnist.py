"""Fashion-MNIST for TFDS, prepared from Debian's offline copy when present.

`apt-get install dataset-fashion-mnist` puts the original idx files under
`/usr/share/datasets/fashion-mnist/`. This builder has the same name, version,
features and example keys as TFDS's own `fashion_mnist`, and encodes pixels
with the same PNG encoder, so the prepared files are byte-identical to those of
`tfds.builder('fashion_mnist').download_and_prepare()`; data prepared either
way is read by either builder. Without the Debian files it falls back to TFDS's
download.
"""

import gzip
import os
import socket
import urllib.parse
import urllib.request

import numpy as np
import tensorflow_datasets as tfds

from vit_jax.data.tf_runtime import tf

LOCAL_DIR = '/usr/share/datasets/fashion-mnist'
_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
              60_000),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz',
             10_000),
}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


def read_idx(path: str) -> np.ndarray:
  """Reads an idx file (gzipped or not): uint8 [N, 28, 28] or [N].

  Raises ValueError if the header is not an idx uint8 images/labels header.
  """
  with tf.io.gfile.GFile(path, 'rb') as f:
    data = f.read()
  if data[:2] == b'\x1f\x8b':
    data = gzip.decompress(data)
  magic = int.from_bytes(data[:4], 'big')
  if magic == _IMAGES_MAGIC:
    n, rows, cols = (int.from_bytes(data[i:i + 4], 'big') for i in (4, 8, 12))
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)
  if magic == _LABELS_MAGIC:
    return np.frombuffer(data, np.uint8, offset=8)
  raise ValueError(f'{path} is not an idx images/labels file (magic {magic}).')


def local_files_present(local_dir: str = LOCAL_DIR) -> bool:
  return all(os.path.exists(os.path.join(local_dir, name))
             for images, labels, _ in _FILES.values()
             for name in (images, labels))


def _encode_png(images: np.ndarray) -> list[bytes]:
  """PNG-encodes uint8 [N, H, W, 1] in parallel, as TFDS's encoder does."""
  ds = tf.data.Dataset.from_tensor_slices(images).map(
      tf.io.encode_png, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return [png for batch in ds.batch(8192).as_numpy_iterator() for png in batch]


def _check_reachable(url: str, timeout: float = 10.0) -> None:
  """Raises ConnectionError if `url`'s host does not accept a connection."""
  parsed = urllib.parse.urlparse(url)
  if parsed.scheme in urllib.request.getproxies():
    return  # Only the proxy can tell.
  port = parsed.port or (443 if parsed.scheme == 'https' else 80)
  try:
    socket.create_connection((parsed.hostname, port), timeout=timeout).close()
  except OSError as e:
    raise ConnectionError(f'cannot reach {parsed.hostname}:{port} ({e}); '
                          'no local Fashion-MNIST files either') from e


class FashionMnist(tfds.image_classification.FashionMNIST,
                   skip_registration=True):
  """TFDS `fashion_mnist` 3.0.1 that reads the local idx files when it can."""

  name = 'fashion_mnist'
  local_dir = LOCAL_DIR

  def _split_generators(self, dl_manager):
    if not local_files_present(self.local_dir):
      _check_reachable(self.URL)  # Fail in seconds, not after retries.
      return super()._split_generators(dl_manager)  # Downloads.
    return {
        split: self._generate_examples(
            num_examples=count,
            data_path=os.path.join(self.local_dir, images),
            label_path=os.path.join(self.local_dir, labels))
        for split, (images, labels, count) in _FILES.items()
    }

  def _generate_examples(self, num_examples, data_path, label_path):
    """Yields `(index, {'image': png bytes, 'label': int})`, as TFDS does."""
    images, labels = read_idx(data_path), read_idx(label_path)
    if len(images) != num_examples or len(labels) != num_examples:
      raise ValueError(
          f'{data_path}: expected {num_examples} images and labels, found '
          f'{len(images)} and {len(labels)}.')
    pngs = _encode_png(images[..., None])
    for index, (png, label) in enumerate(zip(pngs, labels)):
      yield index, {'image': png, 'label': int(label)}
