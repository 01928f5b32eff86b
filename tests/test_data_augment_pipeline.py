"""The train pipeline on the offline `digits` dataset with RandAugment and
random erasing on (vit_jax/data/augment.py): exactly repeatable and resumable,
and evaluation untouched by the augmentation keys."""

import itertools

import numpy as np
import pytest

from configs import common
from vit_jax import data


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds_digits_augment')
  data.get_dataset_info(_config(data_dir))
  return data_dir


def _config(data_dir, **pp):
  config = common.get_config()
  config.dataset = 'digits'
  config.input.data_dir = str(data_dir)
  config.input.image_size = 12
  config.input.channels = 3
  config.input.prefetch = 1
  config.input.shuffle_buffer = 300
  config.pp.update(pp)
  return config


def _take(config, n, **kwargs):
  return list(itertools.islice(
      data.train_iterator(config, local_batch_size=64, **kwargs), n))


@pytest.mark.parametrize('cache', [True, False])
def test_pipeline_repeatable_and_resumes_with_augmentation(digits_dir, cache):
  config = _config(digits_dir, randaugment_layers=2, randaugment_magnitude=15.0,
                   random_erase_prob=0.5)
  config.input.cache = cache
  first = _take(config, 3)
  resumed = _take(config, 2, start_step=1)  # Same (seed, step): same batch.
  for a, b in zip(first[1:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(first[1]['image'], first[2]['image'])
  plain_config = _config(digits_dir)
  plain_config.input.cache = cache
  plain = _take(plain_config, 1)
  np.testing.assert_array_equal(first[0]['label'], plain[0]['label'])
  assert not np.array_equal(first[0]['image'], plain[0]['image'])


def test_eval_unchanged_by_augmentation_keys(digits_dir):
  on = _config(digits_dir, randaugment_layers=2, random_erase_prob=1.0)
  (a,) = itertools.islice(data.eval_iterator(on, 'test', local_batch_size=64), 1)
  (b,) = itertools.islice(
      data.eval_iterator(_config(digits_dir), 'test', local_batch_size=64), 1)
  np.testing.assert_array_equal(a['image'], b['image'])
