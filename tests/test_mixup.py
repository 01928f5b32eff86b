"""Mixup / cutmix: lambda and box maths, soft targets, keys, and the train step."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from vit_jax import config_checks
from vit_jax import mixup
from vit_jax import models
from vit_jax import optim
from vit_jax import parallel
from vit_jax import run_setup
from vit_jax import steps

IMAGE_SHAPE = (8, 8, 3)


def _mixup(**overrides) -> ml_collections.ConfigDict:
  section = common.get_config().mixup
  section.update(overrides)
  return section


def _batch(size=16, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.uniform(-1, 1, (size,) + IMAGE_SHAPE).astype(np.float32),
          'label': rng.integers(0, 10, size).astype(np.int32)}


# ------------------------------------------------------------------ maths
def test_centred_box_has_the_nominal_area():
  # lam 0.75 -> sides 8 * sqrt(0.25) = 4; any centre with 2 <= c <= 6 fits.
  for seed in range(20):
    key = jax.random.key(seed)
    cy, cx = (int(jax.random.randint(k, (), 0, 8)) for k in jax.random.split(key))
    mask, lam = mixup.cutmix_box(key, jnp.float32(0.75), 8, 8)
    assert int(mask.sum()) == round((1 - float(lam)) * 64)
    if 2 <= cy <= 6 and 2 <= cx <= 6:
      assert float(lam) == 0.75 and int(mask.sum()) == 16


def test_clipped_box_corrects_lambda_to_its_area():
  lams = []
  for seed in range(50):
    mask, lam = mixup.cutmix_box(jax.random.key(seed), jnp.float32(0.3), 8, 16)
    area = int(mask.sum())
    np.testing.assert_allclose(float(lam), 1 - area / 128, rtol=0, atol=1e-7)
    rows, cols = np.nonzero(np.asarray(mask))
    if area:  # A rectangle: every pixel of its bounding box is inside.
      assert area == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    lams.append(float(lam))
  assert min(lams) >= 0.3 - 1e-6 and max(lams) > 0.3  # clipping only shrinks


@pytest.mark.parametrize('overrides,cutmix', [
    (dict(mixup_alpha=0.2), 'never'),
    (dict(cutmix_alpha=1.0), 'always'),
    (dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=1.0), 'always'),
    (dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.0), 'never'),
    (dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5), 'sometimes'),
])
def test_mixup_cutmix_switch(overrides, cutmix):
  section = _mixup(**overrides)
  draws = [mixup.sample_mixing(jax.random.key(s), section, 8, 8)
           for s in range(40)]
  used = [bool(c) for _, c, _ in draws]
  expected = {'never': [False], 'always': [True], 'sometimes': [False, True]}
  assert sorted(set(used)) == expected[cutmix]
  for lam, use_cutmix, mask in draws:
    assert 0 <= float(lam) <= 1
    if not use_cutmix:
      assert not bool(mask.any())


def test_prob_zero_leaves_the_batch_unchanged_with_smoothed_one_hot_targets():
  batch = _batch()
  out = mixup.mix_batch(jax.random.key(0), batch, _mixup(mixup_alpha=1.0,
                        cutmix_alpha=1.0, prob=0.0), num_classes=10,
                        label_smoothing=0.1)
  np.testing.assert_array_equal(out['image'], batch['image'])
  np.testing.assert_allclose(
      out['label'], optim.one_hot_smoothed(batch['label'], 10, 0.1), atol=1e-7)


@pytest.mark.parametrize('overrides', [dict(mixup_alpha=0.8),
                                       dict(cutmix_alpha=1.0)])
def test_mixed_images_and_targets_use_the_reversed_batch(overrides):
  batch = _batch()
  key = jax.random.key(3)
  section = _mixup(**overrides)
  out = jax.device_get(mixup.mix_batch(key, batch, section, num_classes=10,
                                       label_smoothing=0.1))
  lam, use_cutmix, mask = jax.device_get(mixup.sample_mixing(key, section, 8, 8))
  x, other = batch['image'], batch['image'][::-1]
  if use_cutmix:
    expected = np.where(mask[None, :, :, None], other, x)
  else:
    expected = lam * x + (1 - lam) * other
  np.testing.assert_allclose(out['image'], expected, atol=1e-6)
  assert 0 < lam < 1
  targets = np.asarray(optim.one_hot_smoothed(batch['label'], 10, 0.1))
  np.testing.assert_allclose(out['label'], lam * targets + (1 - lam) * targets[::-1],
                             atol=1e-6)
  np.testing.assert_allclose(out['label'].sum(axis=1), 1.0, atol=1e-6)
  assert out['label'].min() > 0  # Smoothing reaches every class.


def test_deterministic_for_a_key_and_different_across_keys():
  section = _mixup(mixup_alpha=0.8, cutmix_alpha=1.0)
  mix = jax.jit(functools.partial(mixup.mix_batch, mixup=section, num_classes=10))
  batch = _batch()
  a, b = mix(jax.random.key(1), batch), mix(jax.random.key(1), batch)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  others = [mix(jax.random.key(s), batch)['image'] for s in range(2, 6)]
  assert all(np.abs(np.asarray(o) - np.asarray(a['image'])).max() > 1e-3
             for o in others)


def test_per_device_mixing_equals_mixing_the_global_batch():
  """shard_map: same lam on every device, partner from device n-1-d."""
  mesh = parallel.make_mesh(8)
  section = _mixup(mixup_alpha=0.8, cutmix_alpha=1.0)
  batch = _batch(16)
  mix_whole = jax.jit(lambda key, b: mixup.mix_batch(key, b, section,
                                                     num_classes=10))
  mix_per_device = jax.jit(jax.shard_map(
      lambda key, b: mixup.mix_batch(key, b, section, num_classes=10,
                                     axis_name=parallel.DATA_AXIS),
      mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS)),
      out_specs=P(parallel.DATA_AXIS)))
  for seed in range(3):
    key = jax.random.key(seed)
    whole, per_device = mix_whole(key, batch), mix_per_device(key, batch)
    for name in whole:
      np.testing.assert_allclose(per_device[name], whole[name], atol=1e-6)


def test_cross_entropy_with_one_hot_targets_equals_integer_labels():
  logits = jax.random.normal(jax.random.key(0), (6, 10)) * 3
  labels = jnp.array([0, 3, 9, 2, 2, 7])
  for smoothing in (0.0, 0.1):
    integer = optim.cross_entropy_loss(logits, labels, 10, label_smoothing=smoothing)
    soft = optim.cross_entropy_loss(
        logits, optim.one_hot_smoothed(labels, 10, smoothing), 10)
    np.testing.assert_allclose(float(soft), float(integer), rtol=1e-6)


@pytest.mark.parametrize('overrides,message', [
    (dict(mixup_alpha=-0.1), 'mixup_alpha must be >= 0'),
    (dict(cutmix_alpha=-1.0), 'cutmix_alpha must be >= 0'),
    (dict(prob=1.5), r'prob must be in \[0, 1\]'),
    (dict(switch_prob=-0.1), r'switch_prob must be in \[0, 1\]'),
])
def test_bad_values_are_rejected_before_compile(overrides, message):
  config = common.get_config()
  config.total_steps = 1000
  config.mixup.update(overrides)
  with pytest.raises(config_checks.ConfigError, match=message):
    run_setup.check_config(config)


# ------------------------------------------------------------------ train step
def _run(section, *, parallelism='jit', accum_steps=1, num_devices=1,
         num_steps=1):
  """Params after `num_steps` steps of a one-layer ViT-test_4 on 8 px inputs."""
  mesh = parallel.make_mesh(num_devices)
  config = common.get_config()
  # SGD from step 1 (no warmup): the update is proportional to the gradient,
  # so any difference in the mixed batch shows in the params.
  config.optim.name, config.schedule.base_lr, config.schedule.warmup_steps = 'sgd', 0.1, 0
  model = models.create_model('ViT-test_4', 10, num_layers=1)
  tx, _ = optim.make_optimizer(config, total_steps=10)
  init = functools.partial(steps.create_train_state, model, tx, IMAGE_SHAPE, 0)
  sharding = jax.tree.map(lambda _: parallel.replicated(mesh), jax.eval_shape(init))
  state = jax.jit(init, out_shardings=sharding)()
  step = steps.make_train_step(model, tx, num_classes=10, label_smoothing=0.1,
                               accum_steps=accum_steps, parallelism=parallelism,
                               mixup=section)
  if parallelism == 'shard_map':
    step = parallel.shard_map_step(step, mesh)
  step = jax.jit(step, in_shardings=(sharding, parallel.batch_sharding(mesh)),
                 out_shardings=(sharding, parallel.replicated(mesh)))
  for i in range(num_steps):
    state, _ = step(state, parallel.to_global_batch(_batch(16, seed=i), mesh))
  return jax.tree.map(np.asarray, jax.device_get(state.params))


def _assert_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def test_mixup_off_is_the_unchanged_step():
  plain = _run(None)
  _assert_close(_run(common.get_config().mixup), plain, atol=0)  # alphas 0
  assert not mixup.is_enabled(_mixup(mixup_alpha=0.8, prob=0.0))
  mixed = _run(_mixup(mixup_alpha=0.8))
  assert max(np.abs(x - y).max() for x, y in
             zip(jax.tree.leaves(mixed), jax.tree.leaves(plain))) > 1e-6


def test_mixing_is_the_same_for_accumulation_and_parallelism_modes():
  section = _mixup(mixup_alpha=0.8, cutmix_alpha=1.0)
  reference = _run(section, num_devices=8)
  _assert_close(_run(section, num_devices=8, accum_steps=2), reference, atol=1e-5)
  _assert_close(_run(section, num_devices=8, parallelism='shard_map'), reference,
                atol=1e-5)
