"""Unit tests of vit_jax/data/preprocess.py on fixed images."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from vit_jax.data import augment
from vit_jax.data import checks
from vit_jax.data import preprocess

SEED = tf.constant([3, 7], tf.int64)


def _image(height=20, width=30, channels=3):
  """A fixed uint8 image whose pixels differ (a gradient plus a pattern)."""
  rows, cols, chans = np.meshgrid(np.arange(height), np.arange(width),
                                  np.arange(channels), indexing='ij')
  pixels = (rows * 7 + cols * 3 + chans * 50) % 256
  return tf.constant(pixels.astype(np.uint8))


def _pp(**overrides):
  pp = ml_collections.ConfigDict(dict(
      train_crop='inception', area_min=0.05, flip=True, eval_crop_fraction=1.0))
  pp.update(overrides)
  return pp


def _seeds(n):
  return [tf.constant([s, 11], tf.int64) for s in range(n)]


def test_resize_shape_range_and_identity():
  image = _image()
  out = preprocess.resize(image, 16)
  assert out.shape == (16, 16, 3) and out.dtype == tf.float32
  assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 255.0
  same = preprocess.resize(_image(12, 12, 1), 12)
  np.testing.assert_array_equal(same.numpy(), _image(12, 12, 1).numpy())


def test_inception_crop_area_aspect_and_determinism():
  image = _image(40, 40, 3)
  area_min = 0.3
  shapes = set()
  for seed in _seeds(20):
    crop = preprocess.inception_crop(image, seed, area_min)
    h, w, c = crop.shape
    assert c == 3
    assert area_min * 1600 * 0.9 <= h * w <= 1600  # Rounding slack.
    assert 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25
    np.testing.assert_array_equal(
        crop.numpy(), preprocess.inception_crop(image, seed, area_min).numpy())
    shapes.add((h, w))
  assert len(shapes) > 1  # Seeds matter.


def test_inception_crop_is_a_window_of_the_image():
  image = _image(40, 40, 1)
  crop = preprocess.inception_crop(image, SEED, 0.1).numpy()
  h, w, _ = crop.shape
  full = image.numpy()
  found = any(np.array_equal(full[y:y + h, x:x + w], crop)
              for y in range(41 - h) for x in range(41 - w))
  assert found


def test_random_crop_shape_determinism_and_content():
  image = _image(28, 28, 1)
  out = preprocess.random_crop(image, SEED, 28)
  assert out.shape == (28, 28, 1)
  np.testing.assert_array_equal(
      out.numpy(), preprocess.random_crop(image, SEED, 28).numpy())
  resized = preprocess.resize(image, 32).numpy()  # round(28 * 8 / 7) = 32.
  assert any(np.array_equal(resized[y:y + 28, x:x + 28], out.numpy())
             for y in range(5) for x in range(5))
  outs = {preprocess.random_crop(image, s, 28).numpy().tobytes()
          for s in _seeds(10)}
  assert len(outs) > 1


def test_pad_crop_shifts_without_zoom():
  image = _image(28, 28, 1)
  padded = np.pad(image.numpy().astype(np.float32), [(2, 2), (2, 2), (0, 0)])
  offsets = set()
  for seed in _seeds(40):
    out = preprocess.pad_crop(image, seed, 28, 2).numpy()
    assert out.shape == (28, 28, 1)
    np.testing.assert_array_equal(
        out, preprocess.pad_crop(image, seed, 28, 2).numpy())
    # A window of the zero-bordered image at the original scale.
    matches = [(y, x) for y in range(5) for x in range(5)
               if np.array_equal(padded[y:y + 28, x:x + 28], out)]
    assert matches
    offsets.add(matches[0])
  assert len(offsets) > 5  # Shifts both ways, not one fixed offset.
  np.testing.assert_array_equal(  # No border: the image itself.
      preprocess.pad_crop(image, SEED, 28, 0).numpy(),
      image.numpy().astype(np.float32))


def test_central_crop():
  image = _image(32, 32, 3)
  out = preprocess.central_crop(image, 16, 0.5)  # Resize to 32: no-op.
  assert out.shape == (16, 16, 3)
  np.testing.assert_array_equal(out.numpy(),
                                image.numpy()[8:24, 8:24].astype(np.float32))


def test_random_flip_mirrors_or_keeps():
  image = _image(6, 8, 1)
  outcomes = set()
  for seed in _seeds(16):
    out = preprocess.random_flip(image, seed).numpy()
    if np.array_equal(out, image.numpy()):
      outcomes.add('keep')
    else:
      np.testing.assert_array_equal(out, image.numpy()[:, ::-1])
      outcomes.add('flip')
    np.testing.assert_array_equal(
        out, preprocess.random_flip(image, seed).numpy())
  assert outcomes == {'keep', 'flip'}


def test_to_channels():
  gray = _image(4, 4, 1)
  rgb = preprocess.to_channels(gray, 3).numpy()
  assert rgb.shape == (4, 4, 3)
  for c in range(3):
    np.testing.assert_array_equal(rgb[..., c], gray.numpy()[..., 0])
  lum = preprocess.to_channels(tf.cast(_image(4, 4, 3), tf.float32), 1)
  assert lum.shape == (4, 4, 1)
  expected = np.tensordot(_image(4, 4, 3).numpy().astype(np.float32),
                          [0.2989, 0.5870, 0.1140], axes=1)
  np.testing.assert_allclose(lum.numpy()[..., 0], expected, rtol=1e-3)
  assert preprocess.to_channels(_image(4, 4, 4), 3).shape == (4, 4, 3)
  assert preprocess.to_channels(gray, 1) is gray


def test_to_model_range():
  out = preprocess.to_model_range(tf.constant([0, 255, 127.5]))
  np.testing.assert_allclose(out.numpy(), [-1.0, 1.0, 0.0])


@pytest.mark.parametrize('crop', checks.TRAIN_CROPS)
@pytest.mark.parametrize('channels', [1, 3])
def test_train_preprocess(crop, channels):
  fn = preprocess.train_preprocess(_pp(train_crop=crop), 24, channels)
  for image in (_image(28, 28, 1), _image(50, 40, 3)):
    out = fn(image, SEED)
    assert out.shape == (24, 24, channels) and out.dtype == tf.float32
    assert -1.0 <= float(tf.reduce_min(out)) <= float(tf.reduce_max(out)) <= 1.0
    np.testing.assert_array_equal(out.numpy(), fn(image, SEED).numpy())
  image = _image(50, 40, 3)
  other = fn(image, tf.constant([4, 7], tf.int64))
  if crop != 'resize':
    assert not np.array_equal(other.numpy(), fn(image, SEED).numpy())


@pytest.mark.parametrize('fraction', [1.0, 0.875])
def test_eval_preprocess(fraction):
  fn = preprocess.eval_preprocess(_pp(eval_crop_fraction=fraction), 16, 3)
  out = fn(_image(20, 30, 1))
  assert out.shape == (16, 16, 3)
  assert -1.0 <= float(tf.reduce_min(out)) <= float(tf.reduce_max(out)) <= 1.0


@pytest.mark.parametrize('bad', [dict(train_crop='center'), dict(area_min=0.0),
                                 dict(eval_crop_fraction=1.5),
                                 dict(crop_padding=-1), dict(crop_padding=2.5)])
def test_check_pp_rejects(bad):
  with pytest.raises(ValueError):
    checks.check_pp(_pp(**bad))


def test_the_randaugment_rules_the_check_allows_are_the_rules_augment_has():
  assert checks.RANDAUGMENT_RULES == augment.RULES
  assert checks.DEFAULT_RANDAUGMENT_RULE == augment.DEFAULT_RULE
