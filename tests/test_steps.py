"""Train/eval steps: parallelism modes, device counts and accumulation agree."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax import optim
from vit_jax import parallel
from vit_jax import sharding
from vit_jax import steps

from tiny import step_config

IMAGE_SHAPE = (16, 16, 3)


_config = step_config


def _batches(num, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  return [{'image': rng.uniform(-1, 1, (batch_size,) + IMAGE_SHAPE).astype(np.float32),
           'label': rng.integers(0, 10, batch_size).astype(np.int32)}
          for _ in range(num)]


def _train(num_devices, parallelism='jit', accum_steps=1, num_steps=3, **model_kw):
  """Runs `num_steps` steps on a `num_devices` mesh; returns params as numpy."""
  mesh = parallel.make_mesh(num_devices)
  config = _config(train={'accum_steps': accum_steps})
  model = models.create_model('ViT-test_4', 10, **model_kw)
  tx, _ = optim.make_optimizer(config, total_steps=10)
  init = functools.partial(steps.create_train_state, model, tx, IMAGE_SHAPE, 0)
  state_sharding = sharding.state_shardings(jax.eval_shape(init), mesh)
  state = jax.jit(init, out_shardings=state_sharding)()
  step = steps.make_train_step(model, tx, num_classes=10, accum_steps=accum_steps,
                               parallelism=parallelism)
  if parallelism == 'shard_map':
    step = parallel.shard_map_step(step, mesh)
  step = jax.jit(step, in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                 out_shardings=(state_sharding, parallel.replicated(mesh)),
                 donate_argnums=0)
  for batch in _batches(num_steps, 16):
    state, metrics = step(state, parallel.to_global_batch(batch, mesh))
    assert np.isfinite(float(metrics['train_loss']))
  assert int(state.step) == num_steps
  return jax.tree.map(np.asarray, jax.device_get(state.params))


def _assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def test_eight_devices_have_been_simulated():
  assert jax.device_count() == 8


@pytest.fixture(scope='module')
def jit_8_devices():
  return _train(8, 'jit')


def test_shard_map_equals_jit(jit_8_devices):
  _assert_trees_close(_train(8, 'shard_map'), jit_8_devices, atol=1e-5)


def test_eight_devices_equal_one(jit_8_devices):
  _assert_trees_close(_train(1, 'jit'), jit_8_devices, atol=1e-5)


def test_gradient_accumulation_equals_big_batch(jit_8_devices):
  _assert_trees_close(_train(8, 'jit', accum_steps=2), jit_8_devices, atol=1e-5)


def test_dropout_training_runs_in_both_modes_and_moves_params():
  initial = _train(8, 'jit', num_steps=0, dropout_rate=0.1)
  for parallelism in parallel.PARALLELISMS:
    trained = _train(8, parallelism, dropout_rate=0.1)
    moved = [np.abs(a - b).max() for a, b in
             zip(jax.tree.leaves(trained), jax.tree.leaves(initial))]
    assert max(moved) > 1e-4
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(trained))


def test_eval_step_counts_hits_and_ignores_padding():
  model = models.create_model('ViT-test_4', 10)
  eval_step = jax.jit(steps.make_eval_step(model, num_classes=10))
  images = jnp.zeros((4,) + IMAGE_SHAPE)
  params = jax.jit(model.init)(jax.random.key(0), images)['params']
  # Head bias fixes the ranking: class 3 > 2 > 1 > 0 > 4 > ... for every image.
  bias = np.full(10, -1.0, np.float32)
  bias[[3, 2, 1, 0, 4]] = [5, 4, 3, 2, 1]
  params['head']['bias'] = jnp.asarray(bias)
  batch = {'image': images, 'label': jnp.array([3, 0, 9, 4]),
           'mask': jnp.array([True, True, True, False])}
  out = jax.device_get(eval_step(params, batch))
  assert float(out['count']) == 3
  assert float(out['top1']) == 1          # label 3 only
  assert float(out['top5']) == 2          # labels 3 and 0; 9 misses; 4 is padding
  logp = jax.nn.log_softmax(jnp.asarray(bias))
  np.testing.assert_allclose(float(out['loss']),
                             -float(logp[3] + logp[0] + logp[9]), rtol=1e-5)


def test_constant_logits_score_one_class_not_all():
  model = models.create_model('ViT-test_4', 10)
  eval_step = jax.jit(steps.make_eval_step(model, num_classes=10))
  images = jnp.zeros((10,) + IMAGE_SHAPE)
  params = jax.jit(model.init)(jax.random.key(0), images)['params']  # zero head: ties
  batch = {'image': images, 'label': jnp.arange(10), 'mask': jnp.ones(10, bool)}
  out = jax.device_get(eval_step(params, batch))
  assert float(out['top1']) == 1 and float(out['top5']) == 5


def test_batch_size_checks_name_the_problem():
  mesh = parallel.make_mesh(8)
  with pytest.raises(ValueError, match='batch_size 12 is not divisible by the 8 devices'):
    parallel.check_batch_size(12, mesh)
  with pytest.raises(ValueError, match='accum_steps 3'):
    parallel.check_batch_size(16, mesh, accum_steps=3)
  with pytest.raises(ValueError, match='micro-batch 4'):
    parallel.check_batch_size(16, mesh, accum_steps=4)
  parallel.check_batch_size(32, mesh, accum_steps=4)
