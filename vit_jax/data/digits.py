"""scikit-learn's handwritten digits (`load_digits`) as TFDS dataset `digits`.

1,797 grayscale 8x8 images of the digits 0-9, shipped inside scikit-learn
(no download). Pixel values 0..16 are scaled to uint8 0..255
(`round(v * 255 / 16)`).
It is small enough to show what fine-tuning a pretrained model buys.

Fixed split: `numpy.random.RandomState(0).permutation(1797)`; its first 1,297
indices are `train`, the remaining 500 `test`. The legacy `RandomState` stream
is frozen by NumPy, so the split never changes. Example keys are the original
`load_digits` indices.
"""

import numpy as np
import tensorflow_datasets as tfds

NUM_EXAMPLES = 1797
NUM_TRAIN = 1297
SPLIT_SEED = 0


def split_indices() -> dict[str, np.ndarray]:
  """The `load_digits` indices of each split (sorted)."""
  perm = np.random.RandomState(SPLIT_SEED).permutation(NUM_EXAMPLES)
  return {'train': np.sort(perm[:NUM_TRAIN]), 'test': np.sort(perm[NUM_TRAIN:])}


def load_uint8() -> tuple[np.ndarray, np.ndarray]:
  """All digits as (uint8 [1797, 8, 8, 1] in 0..255, int64 [1797] labels)."""
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "Dataset 'digits' is built from scikit-learn's load_digits; install "
        'it with `pip install scikit-learn`.') from e
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return images[..., None], digits.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The 8x8 digits of scikit-learn, with a fixed 1,297 / 500 split."""

  name = 'digits'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(
                names=[str(d) for d in range(10)]),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    images, labels = load_uint8()
    return {split: self._generate_examples(images, labels, indices)
            for split, indices in split_indices().items()}

  def _generate_examples(self, images, labels, indices):
    for index in indices:
      yield int(index), {'image': images[index], 'label': labels[index]}
