"""Train/eval iterator guarantees, on the offline `digits` dataset.

Determinism, exact resume (`start_step`), process-count independence, epoch
permutations and eval padding, for both the indexed (`cache=True`) and the
streamed (`cache=False`) training order.
"""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from configs import common
from vit_jax import data
from vit_jax.data import digits

NUM_TRAIN, NUM_TEST = 1297, 500


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds_digits')
  config = _config(data_dir)
  data.get_dataset_info(config)  # Prepares once per session (and worker).
  return data_dir


def _config(data_dir, **overrides):
  config = common.get_config()
  config.dataset = 'digits'
  config.input.data_dir = str(data_dir)
  config.input.image_size = 12
  config.input.channels = 1
  config.input.shuffle_buffer = 300
  config.input.prefetch = 1
  config.lock()  # A key that does not exist is an error, not a new key.
  for key, value in overrides.items():  # pp_<key>, dataset, eval_splits, input keys.
    if key.startswith('pp_'):
      config.pp[key[3:]] = value
    elif key == 'eval_splits':
      config.eval.splits = value
    elif key == 'dataset':
      config.dataset = value
    else:
      config.input[key] = value
  return config


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def _concat_rows(per_process_batches):
  """[process][step] local batches -> [step] global batches."""
  return [{key: np.concatenate([b[key] for b in step]) for key in step[0]}
          for step in zip(*per_process_batches)]


def test_info(digits_dir):
  info = data.get_dataset_info(_config(digits_dir))
  assert info.num_classes == 10
  assert info.class_names == tuple('0123456789')
  assert info.num_examples == {'train': NUM_TRAIN, 'test': NUM_TEST}
  assert info.image_shape == (8, 8, 1)
  assert data.num_eval_batches(info, 'test', 64) == 8


def test_digits_split_matches_sklearn(digits_dir):
  """The prepared splits hold exactly the fixed-permutation digits."""
  images, labels = digits.load_uint8()
  config = _config(digits_dir, image_size=8, eval_splits='train,test')
  for split, indices in digits.split_indices().items():
    (batch,) = data.eval_iterator(config, split, local_batch_size=2000)
    mask = batch['mask']
    got = np.round((batch['image'][mask] + 1) * 127.5).astype(np.uint8)
    got_rows = sorted(zip(batch['label'][mask].tolist(),
                          map(bytes, got.reshape(len(got), -1))))
    want = images[indices].reshape(len(indices), -1)
    want_rows = sorted(zip(labels[indices].tolist(), map(bytes, want)))
    assert got_rows == want_rows


def test_train_batch_format(digits_dir):
  config = _config(digits_dir, image_size=16, channels=3)
  batch = next(data.train_iterator(config, local_batch_size=32))
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (32, 16, 16, 3)
  assert batch['image'].dtype == np.float32
  assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0
  assert batch['label'].dtype == np.int32 and batch['label'].shape == (32,)
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])


@pytest.mark.parametrize('cache', [True, False])
def test_deterministic_and_seeded(digits_dir, cache):
  config = _config(digits_dir, cache=cache)
  first = _take(data.train_iterator(config, local_batch_size=64), 3)
  again = _take(data.train_iterator(config, local_batch_size=64), 3)
  _assert_batches_equal(first, again)
  config.seed = 1
  other = _take(data.train_iterator(config, local_batch_size=64), 1)
  assert not np.array_equal(first[0]['label'], other[0]['label'])


@pytest.mark.parametrize('cache', [True, False])
def test_start_step_resumes_exactly(digits_dir, cache):
  config = _config(digits_dir, cache=cache)
  # 200 per step, 1297 per epoch: epoch 0 ends inside step 6, so resuming at
  # 5 crosses it; resuming at 9 starts 503 examples into epoch 1.
  full = _take(data.train_iterator(config, local_batch_size=200), 12)
  for start in (5, 9):
    resumed = _take(data.train_iterator(config, local_batch_size=200,
                                        start_step=start), 12 - start)
    _assert_batches_equal(full[start:], resumed)


@pytest.mark.parametrize('cache,count', [(True, 2), (False, 2), (True, 3)])
def test_process_count_does_not_change_global_batches(digits_dir, cache,
                                                      count):
  config = _config(digits_dir, cache=cache)
  single = _take(data.train_iterator(config, local_batch_size=96,
                                     start_step=2), 4)
  per_process = [
      _take(data.train_iterator(config, local_batch_size=96 // count,
                                process_index=p, process_count=count,
                                start_step=2), 4)
      for p in range(count)]
  _assert_batches_equal(single, _concat_rows(per_process))


@pytest.mark.parametrize('cache', [True, False])
def test_each_epoch_is_a_permutation(digits_dir, cache):
  """With plain resizing at native size, epoch e's images are the split's."""
  config = _config(digits_dir, cache=cache, image_size=8,
                   pp_train_crop='resize', pp_flip=False)
  epochs = _take(data.train_iterator(config, local_batch_size=NUM_TRAIN), 2)
  reference = next(data.eval_iterator(config, 'train',
                                      local_batch_size=NUM_TRAIN))

  def rows(batch):
    return sorted(zip(batch['label'].tolist(),
                      map(bytes, batch['image'].reshape(NUM_TRAIN, -1))))

  assert rows(epochs[0]) == rows(reference) == rows(epochs[1])
  assert not np.array_equal(epochs[0]['label'], epochs[1]['label'])


def test_eval_counts_every_example_once(digits_dir):
  config = _config(digits_dir)
  batches = list(data.eval_iterator(config, 'test', local_batch_size=64))
  assert len(batches) == data.num_eval_batches(config, 'test', 64) == 8
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.dtype == bool and mask.sum() == NUM_TEST
  assert mask[:NUM_TEST].all() and not mask[NUM_TEST:].any()
  padded = batches[-1]['image'][~batches[-1]['mask']]
  assert padded.shape[0] == 8 * 64 - NUM_TEST and not padded.any()
  labels = np.concatenate([b['label'] for b in batches])[mask]
  assert np.bincount(labels, minlength=10).sum() == NUM_TEST


@pytest.mark.parametrize('count,local', [(2, 64), (3, 100)])
def test_eval_processes_split_the_global_batches(digits_dir, count, local):
  config = _config(digits_dir)
  single = list(data.eval_iterator(config, 'test',
                                   local_batch_size=local * count))
  per_process = [list(data.eval_iterator(config, 'test', local_batch_size=local,
                                         process_index=p, process_count=count))
                 for p in range(count)]
  expected = data.num_eval_batches(config, 'test', local * count)
  assert [len(b) for b in per_process] == [expected] * count
  _assert_batches_equal(single, _concat_rows(per_process))
  total = sum(b['mask'].sum() for batches in per_process for b in batches)
  assert total == NUM_TEST


def test_errors_before_any_model(digits_dir, tmp_path):
  with pytest.raises(ValueError, match="'validation'.*train"):
    data.get_dataset_info(_config(digits_dir, eval_splits='validation'))
  with pytest.raises(ValueError, match="no_such_dataset"):
    data.get_dataset_info(_config(digits_dir, dataset='no_such_dataset'))
  with pytest.raises(FileNotFoundError, match='tfds build mnist'):
    data.get_dataset_info(_config(tmp_path, dataset='mnist'))
  with pytest.raises(ValueError, match='channels'):
    data.check_config(_config(digits_dir, channels=2))
  with pytest.raises(ValueError, match='train_crop'):
    data.check_config(_config(digits_dir, pp_train_crop='center'))


def test_tensorflow_sees_no_accelerators():
  assert not tf.config.get_visible_devices('GPU')
  assert not tf.config.get_visible_devices('TPU')
