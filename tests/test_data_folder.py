"""Image-folder datasets: `folder:/root` with root/<split>/<class>/*.png|jpg."""

import logging

import numpy as np
import pytest
from PIL import Image

from configs import common
from vit_jax import data


def _write_folder(root, *, corrupt=False):
  """train: 3 'a_cat' + 3 'b_dog' (RGB PNG/JPEG, gray PNG); test: 2 + 1."""
  rng = np.random.RandomState(0)
  layout = {'train': {'b_dog': 3, 'a_cat': 3}, 'test': {'a_cat': 2, 'b_dog': 1}}
  for split, classes in layout.items():
    for name, count in classes.items():
      directory = root / split / name
      directory.mkdir(parents=True)
      for i in range(count):
        pixels = rng.randint(0, 256, (10 + i, 14, 3), np.uint8)
        if i == 0:
          Image.fromarray(pixels).save(directory / f'{i}.png')
        elif i == 1:
          Image.fromarray(pixels).save(directory / f'{i}.JPEG', quality=95)
        else:
          Image.fromarray(pixels[..., 0]).save(directory / f'{i}.png')
      (directory / 'notes.txt').write_text('not an image')
  if corrupt:
    (root / 'train' / 'a_cat' / 'broken.jpg').write_bytes(b'\xff\xd8garbage')


def _config(root, eval_splits='test', **input_keys):
  """The image folder at 8 px, RGB; `input_keys` set in config.input."""
  config = common.get_config()
  config.dataset = f'folder:{root}'
  config.input.image_size = 8
  config.input.channels = 3
  config.input.prefetch = 1
  config.lock()  # A key that does not exist is an error, not a new key.
  config.input.update(input_keys)
  config.eval.splits = eval_splits
  return config


def test_info_classes_and_counts(tmp_path):
  _write_folder(tmp_path)
  info = data.get_dataset_info(_config(tmp_path, train_split='train[:50%]'))
  assert info.class_names == ('a_cat', 'b_dog')
  assert info.num_examples == {'train[:50%]': 3, 'test': 3}
  assert info.image_shape == (None, None, 3)


def test_eval_labels_follow_sorted_classes(tmp_path):
  _write_folder(tmp_path)
  (batch,) = data.eval_iterator(_config(tmp_path), 'test', local_batch_size=4)
  np.testing.assert_array_equal(batch['label'], [0, 0, 1, 0])
  np.testing.assert_array_equal(batch['mask'], [True, True, True, False])
  assert batch['image'].shape == (4, 8, 8, 3)


def test_corrupt_file_is_named_or_skipped(tmp_path, caplog):
  _write_folder(tmp_path, corrupt=True)
  broken = str(tmp_path / 'train' / 'a_cat' / 'broken.jpg')
  with pytest.raises(ValueError, match='broken.jpg'):
    data.get_dataset_info(_config(tmp_path))
  with caplog.at_level(logging.WARNING):
    info = data.get_dataset_info(_config(tmp_path, skip_bad_images=True))
  assert info.num_examples['train'] == 6
  assert broken in caplog.text


@pytest.mark.parametrize('cache', [True, False])
def test_train_iterator(tmp_path, cache):
  _write_folder(tmp_path)
  config = _config(tmp_path, cache=cache, channels=1)
  batches = [next(data.train_iterator(config, local_batch_size=4,
                                      start_step=s)) for s in range(3)]
  for batch in batches:
    assert batch['image'].shape == (4, 8, 8, 1)
    assert -1 <= batch['image'].min() and batch['image'].max() <= 1
  # 12 positions = 2 epochs of 6: each epoch has 3 cats and 3 dogs.
  labels = np.concatenate([b['label'] for b in batches])
  assert sorted(labels[:6]) == sorted(labels[6:]) == [0, 0, 0, 1, 1, 1]


def test_cache_does_not_change_folder_batches(tmp_path):
  _write_folder(tmp_path)
  cached, direct = (next(data.train_iterator(_config(tmp_path, cache=c),
                                             local_batch_size=6))
                    for c in (True, False))
  np.testing.assert_array_equal(cached['image'], direct['image'])
  np.testing.assert_array_equal(cached['label'], direct['label'])


def test_folder_errors(tmp_path):
  _write_folder(tmp_path)
  with pytest.raises(ValueError, match=r"'validation'.*\['test', 'train'\]"):
    data.get_dataset_info(_config(tmp_path, eval_splits='validation'))
  with pytest.raises(FileNotFoundError, match='does_not_exist'):
    data.get_dataset_info(_config(tmp_path / 'does_not_exist'))
  (tmp_path / 'test' / 'c_bird').mkdir()
  (tmp_path / 'test' / 'c_bird' / '0.png').write_bytes(
      (tmp_path / 'test' / 'a_cat' / '0.png').read_bytes())
  with pytest.raises(ValueError, match='c_bird'):
    data.get_dataset_info(_config(tmp_path))
