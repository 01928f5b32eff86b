"""The offline Fashion-MNIST builder, checked against a direct idx read.

Needs Debian's `dataset-fashion-mnist` files; preparation (~10 s) happens
once per test session into a temporary data_dir shared by xdist workers.
"""

import hashlib
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import common
from vit_jax import data
from vit_jax.data import fashion_mnist


CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
               'Shirt', 'Sneaker', 'Bag', 'Ankle boot')


@pytest.fixture(scope='session')
def fashion_dir(tmp_path_factory):
  if not fashion_mnist.local_files_present():
    pytest.skip('needs `apt-get install dataset-fashion-mnist`')
  if os.environ.get('PYTEST_XDIST_WORKER'):
    # Shared by the session's workers; the builder's file lock makes one
    # prepare while the others wait.
    data_dir = tmp_path_factory.getbasetemp().parent / 'tfds_fashion_mnist'
  else:
    data_dir = tmp_path_factory.mktemp('tfds_fashion_mnist')
  data.get_dataset_info(_config(data_dir))
  return data_dir


def _config(data_dir, eval_splits='test', **input_keys):
  """Fashion-MNIST at 28 px, one channel; `input_keys` set in config.input."""
  config = common.get_config()
  config.dataset = 'fashion_mnist'
  config.input.data_dir = str(data_dir)
  config.input.image_size = 28
  config.input.channels = 1
  config.input.prefetch = 1
  config.lock()  # A key that does not exist is an error, not a new key.
  config.input.update(input_keys)
  config.eval.splits = eval_splits
  return config


def _idx(split):
  prefix = 'train' if split == 'train' else 't10k'
  directory = fashion_mnist.LOCAL_DIR
  return (fashion_mnist.read_idx(f'{directory}/{prefix}-images-idx3-ubyte.gz'),
          fashion_mnist.read_idx(f'{directory}/{prefix}-labels-idx1-ubyte.gz'))


def _digests(images, labels):
  return sorted(hashlib.sha1(bytes([label]) + image.tobytes()).hexdigest()
                for image, label in zip(images, labels))


def test_info(fashion_dir):
  info = data.get_dataset_info(_config(
      fashion_dir, train_split='train[:98%]', eval_splits='train[98%:],test'))
  assert info.class_names == CLASS_NAMES
  assert info.num_examples == {'train[:98%]': 58_800, 'train[98%:]': 1_200,
                               'test': 10_000}
  assert info.image_shape == (28, 28, 1)


def test_test_split_equals_idx_files(fashion_dir):
  """Same (image, label) pairs as the idx files, and the first few found."""
  (batch,) = data.eval_iterator(_config(fashion_dir), 'test',
                                local_batch_size=10_000)
  assert batch['mask'].all()
  images = np.round((batch['image'][..., 0] + 1) * 127.5).astype(np.uint8)
  want_images, want_labels = _idx('test')
  np.testing.assert_array_equal(np.bincount(batch['label']), [1000] * 10)
  flat = images.reshape(len(images), -1)
  for i in range(5):
    (row,) = np.flatnonzero((flat == want_images[i].reshape(-1)).all(axis=1))
    assert batch['label'][row] == want_labels[i]
  assert _digests(images, batch['label']) == _digests(want_images, want_labels)


def test_official_builder_reads_it(fashion_dir):
  """TFDS's own `fashion_mnist` builder reads the offline-prepared data."""
  builder = tfds.builder('fashion_mnist', data_dir=str(fashion_dir))
  assert type(builder).__name__ == 'FashionMNIST' and builder.is_prepared()
  ds = builder.as_dataset('test', batch_size=10_000)
  batch = next(iter(ds))
  assert batch['image'].shape == (10_000, 28, 28, 1)
  assert np.bincount(batch['label'].numpy()).tolist() == [1000] * 10


def test_train_class_counts(fashion_dir):
  builder = tfds.builder('fashion_mnist', data_dir=str(fashion_dir))
  files = [f.filename for f in builder.info.splits['train'].file_instructions]
  labels = np.concatenate([
      tf.io.parse_example(serialized, {
          'label': tf.io.FixedLenFeature([], tf.int64)})['label'].numpy()
      for serialized in tf.data.TFRecordDataset(files).batch(20_000)])
  _, want_labels = _idx('train')
  assert len(labels) == 60_000
  np.testing.assert_array_equal(np.bincount(labels), np.bincount(want_labels))
  assert np.bincount(want_labels).tolist() == [6000] * 10


def test_train_iterator_upsampled_rgb(fashion_dir):
  config = _config(fashion_dir, train_split='train[:1000]', image_size=32,
                   channels=3)
  batch = next(data.train_iterator(config, local_batch_size=16))
  assert batch['image'].shape == (16, 32, 32, 3)
  assert -1 <= batch['image'].min() and batch['image'].max() <= 1


def test_without_local_files_or_network_says_how_to_get_it(
    tmp_path, monkeypatch):
  monkeypatch.setattr(fashion_mnist.FashionMnist, 'local_dir',
                      str(tmp_path / 'none'))
  monkeypatch.setattr(fashion_mnist.FashionMnist, 'URL',
                      'http://127.0.0.1:9/')  # Nothing listens there.
  for var in ('http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY'):
    monkeypatch.delenv(var, raising=False)
  with pytest.raises(FileNotFoundError,
                     match='apt-get install dataset-fashion-mnist'):
    data.get_dataset_info(_config(tmp_path / 'tfds'))
