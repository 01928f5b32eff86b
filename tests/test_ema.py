"""EMA of parameters: the update, the step, checkpoints, and the loop's metrics."""

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from tiny import step_config
from tiny import tiny_config
from vit_jax import checkpoint
from vit_jax import config_checks
from vit_jax import metrics
from vit_jax import models
from vit_jax import optim
from vit_jax import run_setup
from vit_jax import steps
from vit_jax import trainer
from vit_jax.checkpoint import orbax_state

IMAGE_SHAPE = (8, 8, 3)


def test_ema_update_maths():
  ema, params = {'w': jnp.full(3, 1.0)}, {'w': jnp.zeros(3)}
  np.testing.assert_allclose(steps.ema_update(ema, params, 0.9)['w'], 0.9, rtol=1e-6)
  # n steps towards a constant: p + decay**n * (ema0 - p).
  for _ in range(10):
    ema = steps.ema_update(ema, {'w': jnp.full(3, 2.0)}, 0.5)
  np.testing.assert_allclose(ema['w'], 2.0 - 0.5**10, rtol=1e-6)
  # A decay close to 1 still moves in float32.
  moved = steps.ema_update({'w': jnp.ones(1)}, {'w': jnp.zeros(1)}, 0.99996)['w']
  np.testing.assert_allclose(moved, 0.99996, rtol=1e-7)


def _model_and_tx():
  config = common.get_config()
  config.optim.name, config.schedule.base_lr, config.schedule.warmup_steps = 'adamw', 1e-2, 0
  model = models.create_model('ViT-test_4', 10, num_layers=1)
  return model, optim.make_optimizer(config, total_steps=10)[0]


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.uniform(-1, 1, (8,) + IMAGE_SHAPE).astype(np.float32),
          'label': rng.integers(0, 10, 8).astype(np.int32)}


@pytest.fixture(scope='module')
def two_steps():
  """(initial state, state after 2 steps) with ema_decay 0.5, as numpy."""
  model, tx = _model_and_tx()
  state = jax.jit(functools.partial(steps.create_train_state, model, tx,
                                    IMAGE_SHAPE, 0, ema=True))()
  initial = jax.device_get(state)
  step = jax.jit(steps.make_train_step(model, tx, num_classes=10, ema_decay=0.5),
                 donate_argnums=0)
  history = [initial.params]
  for i in range(2):
    state, _ = step(state, _batch(i))
    history.append(jax.device_get(state.params))
  return initial, jax.device_get(state), history


def test_step_updates_ema_after_each_applied_step(two_steps):
  initial, final, (p0, p1, p2) = two_steps
  for e0, p in zip(jax.tree.leaves(initial.ema_params), jax.tree.leaves(p0)):
    np.testing.assert_array_equal(e0, p)  # Starts at the params.
  expected = jax.tree.map(lambda a, b, c: 0.25 * a + 0.25 * b + 0.5 * c, p0, p1, p2)
  for e, x, p in zip(jax.tree.leaves(final.ema_params), jax.tree.leaves(expected),
                     jax.tree.leaves(p2)):
    np.testing.assert_allclose(e, x, atol=1e-6)
  moved = [np.abs(e - p).max() for e, p in zip(jax.tree.leaves(final.ema_params),
                                                jax.tree.leaves(p2))]
  assert max(moved) > 1e-4  # The average lags the params.


def test_ema_decay_without_an_ema_state_is_an_error():
  model, tx = _model_and_tx()
  state = jax.eval_shape(functools.partial(steps.create_train_state, model, tx,
                                           IMAGE_SHAPE, 0))
  step = steps.make_train_step(model, tx, num_classes=10, ema_decay=0.9)
  with pytest.raises(ValueError, match='ema=True'):
    jax.eval_shape(step, state, _batch())
  with pytest.raises(ValueError, match='ema_decay'):  # Checked with the config.
    steps.check_config(step_config(train={'ema_decay': 1.0}))


def test_checkpoint_saves_and_restores_ema(two_steps, tmp_path):
  _, state, _ = two_steps
  # Async, as the trainer saves (mixing sync and async Orbax saves in one
  # process made later async saves fail now and then).
  manager = orbax_state.make_manager(str(tmp_path / 'w'))
  orbax_state.save(manager, state, {'note': 'test'})
  manager.wait_until_finished()
  layout = orbax_state.layout(state)
  assert any(k.startswith('ema_params/') for k in layout)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  restored, meta = orbax_state.restore(manager, abstract)
  assert set(meta['digest']) == {'params', 'train', 'ema_params'}
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  # A state without EMA (another ema setting) is another layout.
  without = abstract.replace(ema_params=None)
  with pytest.raises(orbax_state.IncompatibleCheckpointError, match='ema_params'):
    orbax_state.restore(manager, without)
  manager.close()
  # load_params keeps its behaviour; ema=True gives the average.
  for ema, expected in ((False, state.params), (True, state.ema_params)):
    loaded = checkpoint.load_params(str(tmp_path / 'w'), ema=ema)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(a, b)


def test_state_without_ema_keeps_the_old_layout(two_steps, tmp_path):
  _, state, _ = two_steps
  plain = state.replace(ema_params=None)
  assert not any('ema' in k for k in orbax_state.layout(plain))
  assert set(orbax_state.digest(plain)) == {'params', 'train'}
  manager = orbax_state.make_manager(str(tmp_path / 'w'))
  orbax_state.save(manager, plain, {})
  manager.wait_until_finished()
  manager.close()
  with pytest.raises(ValueError, match='no ema_params'):
    checkpoint.load_params(str(tmp_path / 'w'), ema=True)


def test_resume_with_another_ema_setting_is_refused(tmp_path):
  config = tiny_config(tmp_path, train={'ema_decay': 0.999})
  meta = orbax_state.resume_meta(config)
  orbax_state.check_resume_meta(meta, config)
  for other in (0.0, 0.9):
    with pytest.raises(config_checks.ConfigError, match='ema_decay: checkpoint 0.999'):
      orbax_state.check_resume_meta(
          meta, tiny_config(tmp_path, train={'ema_decay': other}))
  # Checkpoints written before ema_decay existed resume with EMA off only.
  old = {k: v for k, v in orbax_state.resume_meta(tiny_config(tmp_path)).items()
         if k != 'train.ema_decay'}
  orbax_state.check_resume_meta(old, tiny_config(tmp_path))
  with pytest.raises(config_checks.ConfigError, match='ema_decay'):
    orbax_state.check_resume_meta(old, config)
  with pytest.raises(config_checks.ConfigError, match='ema_decay'):
    run_setup.check_config(tiny_config(tmp_path, train={'ema_decay': 1.0}))


def test_loop_evaluates_saves_and_resumes_the_ema_exactly(tmp_path):
  config = tiny_config(
      tmp_path / 'tfds', batch_size=16, total_steps=4, eval_every=4,
      checkpoint_every=2, eval={'batch_size': 64}, train={'ema_decay': 0.9})
  config.model.num_layers = 1
  config.model.dropout_rate = 0.1  # The rng matters for the resume.
  workdir, resumed = tmp_path / 'w', tmp_path / 'resumed'
  final = trainer.train_and_evaluate(config, str(workdir))
  for name in ('top1', 'top5', 'loss'):
    assert np.isfinite(final[f'eval_test_ema_{name}'])
  rows = [r for r in metrics.read_metrics(str(workdir))
          if 'eval_test_ema_top1' in r]
  assert [r['step'] for r in rows] == [4]
  ema = checkpoint.load_params(str(workdir), ema=True)
  params = checkpoint.load_params(str(workdir))
  assert max(np.abs(a - b).max() for a, b in
             zip(jax.tree.leaves(ema), jax.tree.leaves(params))) > 0
  # Lose the last checkpoint (as a kill after step 2's save would): the
  # resumed run ends bitwise equal, EMA included.
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '4')
  trainer.train_and_evaluate(config, str(resumed))
  for use_ema in (False, True):
    for a, b in zip(
        jax.tree.leaves(checkpoint.load_params(str(workdir), ema=use_ema)),
        jax.tree.leaves(checkpoint.load_params(str(resumed), ema=use_ema))):
      np.testing.assert_array_equal(a, b)
  # The same workdir with EMA off is another run: refused, clearly.
  config.train.ema_decay = 0.0
  with pytest.raises(config_checks.ConfigError, match='ema_decay'):
    trainer.train_and_evaluate(config, str(workdir))
