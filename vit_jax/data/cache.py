"""`config.input.cache`: a split's decoded (pre-augmentation) images held in memory.

Decoding dominates the cost of small-image pipelines, and a small split's
pixels fit in host memory (Fashion-MNIST train: 47 MB), so decode each image
once and serve every epoch from memory by index. Images may differ in size:
all pixels are stored in one flat uint8 buffer with per-image offsets and
shapes. Meant for datasets whose pixels fit comfortably in RAM (and under
TF's 2 GB graph-constant limit); use `config.input.cache=False` beyond that.
"""

import dataclasses

import numpy as np

from vit_jax.data import sources
from vit_jax.data.tf_runtime import tf


@dataclasses.dataclass(frozen=True)
class DecodedSplit:
  """A split's decoded images; image `i` is
  `pixels[offsets[i]:offsets[i] + prod(shapes[i])].reshape(shapes[i])`."""
  pixels: np.ndarray   # uint8 [total pixels]
  offsets: np.ndarray  # int64 [N]
  shapes: np.ndarray   # int32 [N, 3]
  labels: np.ndarray   # int32 [N]

  def lookup(self):
    """Returns `index -> {'image': uint8 [H, W, C], 'label': int32 []}`."""
    pixels, offsets = tf.constant(self.pixels), tf.constant(self.offsets)
    shapes, labels = tf.constant(self.shapes), tf.constant(self.labels)
    channels = set(self.shapes[:, 2].tolist())
    channels = channels.pop() if len(channels) == 1 else None

    def fetch(index):
      shape = shapes[index]
      size = tf.cast(tf.reduce_prod(shape), tf.int64)
      image = tf.reshape(tf.slice(pixels, [offsets[index]], [size]), shape)
      image.set_shape([None, None, channels])
      return {'image': image, 'label': labels[index]}

    return fetch


def decode_split(source: sources.Source, split: str) -> DecodedSplit:
  """Decodes every image of a split (in parallel) into a `DecodedSplit`."""

  def flatten(record):
    example = source.decode(record)
    image = example['image']
    return {'pixels': tf.reshape(image, [-1]), 'shape': tf.shape(image),
            'label': example['label']}

  def concat_pixels(batch):
    pixels = batch['pixels']  # Ragged if sizes differ, else dense.
    if isinstance(pixels, tf.RaggedTensor):
      pixels = pixels.flat_values
    return {**batch, 'pixels': tf.reshape(pixels, [-1])}

  ds = source.records(split).map(
      flatten, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.ragged_batch(4096).map(concat_pixels)
  pixels, shapes, labels = [], [], []
  for batch in ds.as_numpy_iterator():
    pixels.append(batch['pixels'])
    shapes.append(batch['shape'])
    labels.append(batch['label'])
  shapes = np.concatenate(shapes).astype(np.int32)
  sizes = np.prod(shapes.astype(np.int64), axis=1)
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
  return DecodedSplit(np.concatenate(pixels), offsets, shapes,
                      np.concatenate(labels).astype(np.int32))
