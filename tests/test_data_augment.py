"""RandAugment and random erasing (vit_jax/data/augment.py) and their wiring.

Fixed small images; per-op checks against PIL where PIL has the op; the
magnitude -> argument rules ('reference' = TF official / big_vision, the
default, and 'increasing'). The pipeline with augmentation on:
test_data_augment_pipeline.py.
"""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from configs import common
from vit_jax.data import augment
from vit_jax.data import checks
from vit_jax.data import preprocess

SEED = tf.constant([3, 7], tf.int64)
GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout')
PARAMETERLESS = ('AutoContrast', 'Equalize', 'Invert')


def _image(channels=3, size=32):
  """uint8 gradient in [40, 200] with a checker on top: every op changes it."""
  rows, cols, chans = np.meshgrid(np.arange(size), np.arange(size),
                                  np.arange(channels), indexing='ij')
  pixels = 40 + (rows * 3 + cols * 2 + chans * 20) % 140 + 20 * ((rows + cols) % 2)
  return tf.constant(pixels.astype(np.uint8))


def _seeds(n):
  return [tf.constant([s, 11], tf.int64) for s in range(n)]


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('name', list(augment.OPS))
def test_op_shape_dtype_determinism_and_change(name, channels):
  image = _image(channels)
  for rule in augment.RULES:
    for magnitude in (0.0, 5.0, 10.0, 30.0):
      out = augment.apply_op(name, image, SEED, magnitude, rule)
      assert out.shape == image.shape and out.dtype == tf.uint8
      np.testing.assert_array_equal(
          out.numpy(),
          augment.apply_op(name, image, SEED, magnitude, rule).numpy())
  # Under 'increasing' every op is at its strongest reference setting at 10.
  changed = augment.apply_op(name, image, SEED, 10.0, 'increasing').numpy()
  if name == 'Color' and channels == 1:
    np.testing.assert_array_equal(changed, image.numpy())  # No colour to drop.
  else:
    assert not np.array_equal(changed, image.numpy())


@pytest.mark.parametrize('name', [n for n in augment.OPS if n not in PARAMETERLESS])
def test_increasing_magnitude_zero_is_identity(name):
  image = _image(3)
  for seed in _seeds(4):
    np.testing.assert_array_equal(
        augment.apply_op(name, image, seed, 0.0, 'increasing').numpy(),
        image.numpy())


@pytest.mark.parametrize('name', ['Rotate', 'ShearX', 'TranslateY', 'Brightness',
                                  'Cutout'])
def test_seed_picks_sign_or_place(name):
  image = _image(3)
  outs = {augment.apply_op(name, image, s, 10.0, 'increasing').numpy().tobytes()
          for s in _seeds(12)}
  assert len(outs) > 1


def test_geometric_ops_exact():
  image = _image(1)
  x = image.numpy()
  turned = augment.rotate(image, 90.0).numpy()
  back = augment.rotate(image, -90.0).numpy()
  assert {turned.tobytes(), back.tobytes()} == {np.rot90(x, 1).tobytes(),
                                                np.rot90(x, -1).tobytes()}
  shifted = augment.translate_x(image, 0.25).numpy()  # 8 px to the right.
  np.testing.assert_array_equal(shifted[:, 8:], x[:, :-8])
  assert (shifted[:, :8] == 128).all()
  shifted = augment.translate_y(image, -0.25).numpy()  # 8 px up.
  np.testing.assert_array_equal(shifted[:-8], x[8:])
  assert (shifted[-8:] == 128).all()
  sheared = augment.shear_x(image, 0.5).numpy()
  np.testing.assert_array_equal(sheared[0], x[0])  # Row 0 is the pivot.
  np.testing.assert_array_equal(sheared[10, :27], x[10, 5:])


def test_cutout_is_a_grey_square():
  image = _image(3)
  # 10 / 10 * 40 / 224 * 32 = 5.7 -> half-side 6 under either rule.
  for seed in _seeds(6):
    out = augment.apply_op('Cutout', image, seed, 10.0).numpy()
    erased = (out != image.numpy()).any(-1)
    rows, cols = np.nonzero(erased)
    assert (out[erased] == 128).all()
    box = erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.all() and box.shape[0] <= 12 and box.shape[1] <= 12


def test_colour_ops_match_pil():
  x = _image(3).numpy()
  pil = Image.fromarray(x)

  def close(ours, theirs, tol=1):
    diff = np.abs(ours.numpy().astype(int) - np.asarray(theirs).astype(int))
    assert diff.max() <= tol

  close(augment.equalize(tf.constant(x)), ImageOps.equalize(pil), tol=0)
  close(augment.autocontrast(tf.constant(x)), ImageOps.autocontrast(pil))
  close(augment.invert(tf.constant(x)), ImageOps.invert(pil), tol=0)
  close(augment.posterize(tf.constant(x), 3), ImageOps.posterize(pil, 3), tol=0)
  close(augment.solarize(tf.constant(x), 100.0), ImageOps.solarize(pil, 100),
        tol=0)
  for op, enhance in [(augment.color, ImageEnhance.Color),
                      (augment.contrast, ImageEnhance.Contrast),
                      (augment.brightness, ImageEnhance.Brightness),
                      (augment.sharpness, ImageEnhance.Sharpness)]:
    for factor in (0.1, 1.9):
      close(op(tf.constant(x), factor), enhance(pil).enhance(factor))


def _args(name, magnitude, rule, seed=SEED):
  return augment.op_args(name, seed, magnitude, rule)


def test_increasing_rule_arguments():
  assert _args('Posterize', 0.0, 'increasing') == (8,)
  assert _args('Posterize', 10.0, 'increasing') == (4,)
  assert _args('Posterize', 30.0, 'increasing') == (1,)
  assert _args('Solarize', 10.0, 'increasing') == (0.0,)
  (degrees,) = _args('Rotate', 10.0, 'increasing')
  assert abs(float(degrees)) == pytest.approx(30.0)
  (factor,) = _args('Contrast', 10.0, 'increasing')
  assert float(factor) in (pytest.approx(0.1), pytest.approx(1.9))
  (fraction,) = _args('TranslateX', 20.0, 'increasing')
  assert abs(float(fraction)) == pytest.approx(200 / 224)
  for bad in (-1.0, 30.5):
    with pytest.raises(ValueError, match='magnitude'):
      augment.randaugment(_image(), SEED, 2, bad)


ENHANCE = ('Color', 'Contrast', 'Brightness', 'Sharpness')


@pytest.mark.parametrize('magnitude,expected', [
    # TF official / big_vision level_to_arg, _MAX_LEVEL = 10.
    (0.0, dict(Posterize=0, Solarize=0, SolarizeAdd=0, enhance=0.1, Rotate=0,
               Shear=0, Translate=0, Cutout=0)),
    (5.0, dict(Posterize=2, Solarize=128, SolarizeAdd=55, enhance=1.0,
               Rotate=15, Shear=0.15, Translate=50 / 224, Cutout=20 / 224)),
    (10.0, dict(Posterize=4, Solarize=256, SolarizeAdd=110, enhance=1.9,
                Rotate=30, Shear=0.3, Translate=100 / 224, Cutout=40 / 224)),
    # int() truncates as in the reference.
    (3.3, dict(Posterize=1, Solarize=84, SolarizeAdd=36, enhance=0.694,
               Rotate=9.9, Shear=0.099, Translate=33 / 224, Cutout=13 / 224)),
    # Beyond 10 it extrapolates (AugReg uses 15 and 20).
    (20.0, dict(Posterize=8, Solarize=512, SolarizeAdd=220, enhance=3.7,
                Rotate=60, Shear=0.6, Translate=200 / 224, Cutout=80 / 224)),
])
def test_reference_rule_arguments(magnitude, expected):
  for name in PARAMETERLESS:
    assert _args(name, magnitude, 'reference') == ()
  for name in ('Posterize', 'Solarize', 'SolarizeAdd'):
    (value,) = _args(name, magnitude, 'reference')
    assert isinstance(value, int) and value == expected[name], name
  for seed in _seeds(8):
    for name in ENHANCE:  # No random sign: the same factor for every seed.
      (factor,) = _args(name, magnitude, 'reference', seed)
      assert float(factor) == pytest.approx(expected['enhance']), name
    for name, key in [('Rotate', 'Rotate'), ('ShearX', 'Shear'),
                      ('ShearY', 'Shear'), ('TranslateX', 'Translate'),
                      ('TranslateY', 'Translate')]:
      (value,) = _args(name, magnitude, 'reference', seed)
      assert abs(float(value)) == pytest.approx(expected[key]), name
    fraction, cutout_seed = _args('Cutout', magnitude, 'reference', seed)
    assert fraction == pytest.approx(expected['Cutout'])
    assert cutout_seed is seed
  signs = {float(_args('Rotate', 10.0, 'reference', s)[0]) > 0
           for s in _seeds(12)}
  assert signs == {True, False}


def test_reference_rule_posterize_beyond_8_bits_is_identity():
  # The reference would shift by a negative amount (an error) past 22.5.
  assert _args('Posterize', 30.0, 'reference') == (8,)
  image = _image(3)
  np.testing.assert_array_equal(
      augment.apply_op('Posterize', image, SEED, 30.0, 'reference').numpy(),
      image.numpy())


def test_reference_rule_effects():
  image = _image(3)
  x = image.numpy()
  pil = Image.fromarray(x)

  def ref(name, magnitude, seed=SEED):
    return augment.apply_op(name, image, seed, magnitude, 'reference').numpy()

  np.testing.assert_array_equal(ref('Posterize', 10.0), x & 0xF0)  # 4 bits.
  # 0 bits: TF clamps the reference's 8-bit uint8 shift to 7, keeping 1 bit.
  np.testing.assert_array_equal(ref('Posterize', 0.0), x & 0x80)
  np.testing.assert_array_equal(ref('Solarize', 10.0), x)  # Threshold 256.
  np.testing.assert_array_equal(ref('Solarize', 0.0), 255 - x)  # Threshold 0.
  np.testing.assert_array_equal(ref('SolarizeAdd', 0.0), x)
  added = np.where(x < 128, np.minimum(x.astype(int) + 110, 255), x)
  np.testing.assert_array_equal(ref('SolarizeAdd', 10.0), added)
  for name, enhance in [('Color', ImageEnhance.Color),
                        ('Contrast', ImageEnhance.Contrast),
                        ('Brightness', ImageEnhance.Brightness),
                        ('Sharpness', ImageEnhance.Sharpness)]:
    np.testing.assert_array_equal(ref(name, 5.0), x)  # Factor 1.0.
    for magnitude, factor in [(0.0, 0.1), (10.0, 1.9)]:
      for seed in _seeds(3):  # Unsigned: every seed gives the same image.
        diff = ref(name, magnitude, seed).astype(int) - np.asarray(
            enhance(pil).enhance(factor)).astype(int)
        assert np.abs(diff).max() <= 1, (name, magnitude)
  for name in GEOMETRIC:
    np.testing.assert_array_equal(ref(name, 0.0), x)


def test_rules_differ_and_unknown_rule_is_an_error():
  image = _image(3)
  # Magnitude 0: mostly the identity under 'increasing', strong under
  # 'reference' (Posterize to 1 bit, full Solarize, enhance factor 0.1).
  outs = {rule: [augment.randaugment(image, s, 2, 0.0, rule).numpy()
                 for s in _seeds(8)] for rule in augment.RULES}
  assert any(not np.array_equal(a, b)
             for a, b in zip(outs['reference'], outs['increasing']))
  with pytest.raises(ValueError, match="'timm'.*'reference', 'increasing'"):
    augment.randaugment(image, SEED, 2, 10.0, 'timm')
  with pytest.raises(ValueError, match='timm'):
    augment.apply_op('Rotate', image, SEED, 10.0, 'timm')


@pytest.mark.parametrize('rule', augment.RULES)
@pytest.mark.parametrize('channels', [1, 3])
def test_randaugment_deterministic_graph_equals_eager(channels, rule):
  image = _image(channels)
  graph = tf.function(lambda x, s: augment.randaugment(x, s, 2, 15.0, rule),
                      autograph=False)
  outs = set()
  for seed in _seeds(8):
    eager = augment.randaugment(image, seed, 2, 15.0, rule)
    assert eager.shape == image.shape and eager.dtype == tf.uint8
    np.testing.assert_array_equal(eager.numpy(), graph(image, seed).numpy())
    np.testing.assert_array_equal(
        eager.numpy(), augment.randaugment(image, seed, 2, 15.0, rule).numpy())
    outs.add(eager.numpy().tobytes())
  assert len(outs) >= 6  # Seeds choose ops (16 x 16 pairs) and signs.
  np.testing.assert_array_equal(
      augment.randaugment(image, SEED, 0, 10.0).numpy(), image.numpy())


def test_random_erasing_one_box_of_noise():
  image = tf.fill([32, 32, 3], 0.5)
  np.testing.assert_array_equal(
      augment.random_erasing(image, SEED, 0.0).numpy(), image.numpy())
  outs = set()
  for seed in _seeds(12):
    out = augment.random_erasing(image, seed, 1.0).numpy()
    np.testing.assert_array_equal(out,
                                  augment.random_erasing(image, seed, 1.0).numpy())
    erased = (out != 0.5).any(-1)
    rows, cols = np.nonzero(erased)
    box = erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.all()  # One rectangle.
    assert 0.02 * 1024 * 0.7 <= box.size <= 1024 / 3 * 1.2  # Rounding slack.
    assert 0.2 < out[erased].std() < 2.0  # Per-pixel N(0, 1) noise.
    outs.add(out.tobytes())
  assert len(outs) == 12
  erased_count = sum(
      (augment.random_erasing(image, s, 0.5).numpy() != 0.5).any()
      for s in _seeds(20))
  assert 3 <= erased_count <= 17


def _pp(**overrides):
  pp = common.get_config().pp
  pp.update(overrides)
  return pp


@pytest.mark.parametrize('key,value', [
    ('randaugment_layers', -1), ('randaugment_magnitude', 30.5),
    ('randaugment_magnitude', -1.0), ('random_erase_prob', 1.5),
    ('random_erase_prob', -0.1)])
def test_check_pp_rejects_bad_augmentation(key, value):
  with pytest.raises(ValueError, match=f'config.pp.{key}'):
    checks.check_pp(_pp(**{key: value}))


def test_check_pp_rejects_unknown_randaugment_rule():
  with pytest.raises(ValueError) as error:
    checks.check_pp(_pp(randaugment_rule='timm'))
  message = str(error.value)
  assert "config.pp.randaugment_rule='timm'" in message
  assert "'reference'" in message and "'increasing'" in message
  with pytest.raises(ValueError, match='config.pp.randaugment_rule'):
    checks.check_pp(_pp(randaugment_rule='Reference'))


def test_train_preprocess_passes_the_rule():
  image = _image(3, 40)
  on = dict(randaugment_layers=2, randaugment_magnitude=0.0)
  fns = {rule: preprocess.train_preprocess(
      _pp(randaugment_rule=rule, **on), 24, 3) for rule in augment.RULES}
  # A pp section without the key (saved before it existed) gets 'reference'.
  old = {k: v for k, v in _pp(**on).items() if k != 'randaugment_rule'}
  old_fn = preprocess.train_preprocess(ml_collections.ConfigDict(old), 24, 3)
  differ = 0
  for seed in _seeds(6):
    ref = fns['reference'](image, seed).numpy()
    np.testing.assert_array_equal(old_fn(image, seed).numpy(), ref)
    differ += not np.array_equal(ref, fns['increasing'](image, seed).numpy())
  assert differ > 0


def test_pp_keys_defaults_and_old_configs():
  pp = common.get_config().pp
  assert (pp.randaugment_layers, pp.randaugment_magnitude,
          pp.randaugment_rule, pp.random_erase_prob) == (0, 10.0, 'reference',
                                                         0.0)
  pp.randaugment_magnitude = 20  # An int is accepted for the float key.
  checks.check_pp(pp)
  with pytest.raises(TypeError):
    pp.randaugment_layers = 1.5
  # A pp section saved before these keys existed: augmentation off.
  old = {k: v for k, v in common.get_config().pp.items()
         if not k.startswith(('randaug', 'random_erase'))}
  fn = preprocess.train_preprocess(ml_collections.ConfigDict(old), 16, 3)
  new = preprocess.train_preprocess(common.get_config().pp, 16, 3)
  image = _image(3)
  np.testing.assert_array_equal(fn(image, SEED).numpy(),
                                new(image, SEED).numpy())


@pytest.mark.parametrize('channels', [1, 3])
def test_train_preprocess_order(channels):
  """Erasing changes only one box of the RandAugment output: same crop/flip."""
  image = _image(1, 40)
  plain = preprocess.train_preprocess(_pp(), 24, channels)(image, SEED).numpy()
  ra = preprocess.train_preprocess(
      _pp(randaugment_layers=2, randaugment_magnitude=15.0), 24, channels)
  ra_out = ra(image, SEED).numpy()
  assert ra_out.shape == (24, 24, channels) and ra_out.dtype == np.float32
  assert -1.0 <= ra_out.min() and ra_out.max() <= 1.0
  assert not np.array_equal(ra_out, plain)
  np.testing.assert_array_equal(ra_out, ra(image, SEED).numpy())
  both = preprocess.train_preprocess(
      _pp(randaugment_layers=2, randaugment_magnitude=15.0,
          random_erase_prob=1.0), 24, channels)(image, SEED).numpy()
  erased = (both != ra_out).any(-1)
  assert 0 < erased.sum() <= 24 * 24 / 3 * 1.2
  np.testing.assert_array_equal(both[~erased], ra_out[~erased])
