"""Tests for vit_jax.optim: schedules, optimizer chain, loss, gradient accumulation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from vit_jax import optim
from vit_jax import param_rules


def _config(**overrides):
  config = common.get_config()
  config.total_steps = 100
  config.schedule.warmup_steps = 0
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


# No warmup, no decay: the lr is schedule.base_lr from the first step.
CONSTANT_LR = {'schedule.name': 'constant', 'schedule.warmup_steps': 0}


def _lr(schedule, step):
  return float(schedule(step))


# ------------------------------------------------------------------ schedules
@pytest.mark.parametrize('name, mid, end', [
    ('cosine', 0.5, 0.1),       # Halfway through the decay: (base + end) / 2.
    ('linear', 0.5, 0.1),
    ('constant', 0.9, 0.9),
])
def test_schedule_key_steps(name, mid, end):
  config = _config(**{'schedule.name': name, 'schedule.base_lr': 0.9,
                      'schedule.end_lr': 0.1,
                      'schedule.warmup_steps': 10})
  schedule = optim.make_schedule(config, total_steps=110)
  assert _lr(schedule, 0) == 0.0
  assert _lr(schedule, 5) == pytest.approx(0.45)       # Linear warmup.
  assert _lr(schedule, 10) == pytest.approx(0.9)       # Warmup end: base.
  assert _lr(schedule, 60) == pytest.approx(mid if name != 'cosine' else 0.5)
  assert _lr(schedule, 110) == pytest.approx(end, abs=1e-6)
  assert _lr(schedule, 500) == pytest.approx(end, abs=1e-6)  # Past the end.


def test_cosine_quarter_point():
  config = _config(**{'schedule.name': 'cosine', 'schedule.base_lr': 1.0,
                      'schedule.warmup_steps': 0})
  schedule = optim.make_schedule(config, total_steps=100)
  assert _lr(schedule, 0) == pytest.approx(1.0)
  assert _lr(schedule, 25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_rsqrt_with_and_without_warmup():
  config = _config(**{'schedule.name': 'rsqrt', 'schedule.base_lr': 1.0,
                      'schedule.warmup_steps': 100})
  schedule = optim.make_schedule(config, total_steps=10_000)
  assert _lr(schedule, 50) == pytest.approx(0.5)
  assert _lr(schedule, 100) == pytest.approx(1.0)
  assert _lr(schedule, 400) == pytest.approx(math.sqrt(100 / 400))   # sqrt(w/step)
  config = _config(**{'schedule.name': 'rsqrt', 'schedule.base_lr': 1.0,
                      'schedule.warmup_steps': 0,
                      'schedule.timescale': 1000})
  schedule = optim.make_schedule(config, total_steps=10_000)
  assert _lr(schedule, 0) == pytest.approx(1.0)
  assert _lr(schedule, 3000) == pytest.approx(0.5)                   # sqrt(1k/4k)


def test_schedule_errors():
  with pytest.raises(ValueError, match='cosine.*linear.*rsqrt.*constant'):
    optim.check_config(_config(**{'schedule.name': 'cosin'}))
  with pytest.raises(ValueError, match='warmup_steps'):
    optim.make_schedule(_config(**{'schedule.warmup_steps': 101}), 100)


# ------------------------------------------------------------------ optimizer
def _params():
  return {'dense': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones((2,))}}


def _step(tx, params, grads, steps=1):
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize('name', ['sgd', 'adamw', 'adam'])
def test_weight_decay_only_on_masked_params(name):
  config = _config(**CONSTANT_LR, **{'optim.name': name, 'optim.weight_decay': 0.1,
                                      'schedule.base_lr': 0.5})
  tx, _ = optim.make_optimizer(config, total_steps=10)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, _params())
  new, _ = _step(tx, _params(), zeros)
  np.testing.assert_array_equal(new['dense']['bias'], 1.0)       # Not decayed.
  assert np.all(np.asarray(new['dense']['kernel']) < 1.0)        # Shrinks.
  if name != 'adam':  # Decoupled, times lr: 1 - 0.5 * 0.1.
    np.testing.assert_allclose(new['dense']['kernel'], 0.95, rtol=1e-6)


def test_adam_vs_adamw_weight_decay():
  """adamw decays by lr * wd * p; adam's L2 term goes through Adam's rescaling."""
  grads = {'dense': {'kernel': jnp.full((3, 2), 0.01), 'bias': jnp.zeros((2,))}}
  out = {}
  for name in ('adam', 'adamw'):
    config = _config(**CONSTANT_LR, **{'optim.name': name, 'optim.weight_decay': 0.1,
                                        'schedule.base_lr': 0.01})
    tx, _ = optim.make_optimizer(config, 10)
    out[name] = np.asarray(_step(tx, _params(), grads)[0]['dense']['kernel'])
  # First Adam step moves by ~lr regardless of the gradient's size.
  np.testing.assert_allclose(out['adam'], 1 - 0.01, rtol=1e-5)
  np.testing.assert_allclose(out['adamw'], 1 - 0.01 - 0.01 * 0.1, rtol=1e-5)


def test_wd_mask_matching_nothing_is_an_error():
  config = _config(**{'optim.weight_decay': 0.1, 'optim.wd_mask': '.*/kernal'})
  with pytest.raises(ValueError, match='matches no parameter'):
    param_rules.check_rules_select(config, _params())


def test_clipping_bounds_the_update():
  config = _config(**CONSTANT_LR, **{'optim.name': 'sgd', 'optim.momentum': 0.0,
                                      'optim.grad_clip_norm': 1.0, 'schedule.base_lr': 1.0})
  tx, _ = optim.make_optimizer(config, 10)
  grads = jax.tree_util.tree_map(lambda p: 100.0 * jnp.ones_like(p), _params())
  updates, _ = tx.update(grads, tx.init(_params()), _params())
  assert float(optax.global_norm(updates)) == pytest.approx(1.0, rel=1e-5)
  config.optim.grad_clip_norm = 0.0
  tx, _ = optim.make_optimizer(config, 10)
  updates, _ = tx.update(grads, tx.init(_params()), _params())
  assert float(optax.global_norm(updates)) == pytest.approx(100 * math.sqrt(8))


def _traces(state):
  return [s for s in jax.tree_util.tree_leaves(
      state, is_leaf=lambda x: isinstance(x, optax.TraceState))
          if isinstance(s, optax.TraceState)]


def test_sgd_momentum_nesterov_and_bf16_accumulator():
  config = _config(**CONSTANT_LR, **{
      'optim.name': 'sgd', 'optim.momentum': 0.9, 'optim.nesterov': True,
      'optim.accumulator_dtype': 'bfloat16', 'optim.grad_clip_norm': 0.0,
      'schedule.base_lr': 1.0})
  tx, _ = optim.make_optimizer(config, 10)
  grads = jax.tree_util.tree_map(jnp.ones_like, _params())
  new, state = _step(tx, _params(), grads)
  (trace,) = _traces(state)
  assert trace.trace['dense']['kernel'].dtype == jnp.bfloat16
  # Nesterov's first step: g + momentum * g = 1.9.
  np.testing.assert_allclose(new['dense']['bias'], 1 - 1.9, rtol=1e-2)
  config.optim.nesterov = False
  tx, _ = optim.make_optimizer(config, 10)
  new, _ = _step(tx, _params(), grads, steps=2)
  np.testing.assert_allclose(new['dense']['bias'], 1 - 1 - 1.9, rtol=1e-2)
  config.optim.momentum = 0.0
  tx, _ = optim.make_optimizer(config, 10)
  assert not _traces(tx.init(_params()))


def test_adam_first_moment_dtype():
  config = _config(**{'optim.name': 'adamw', 'optim.accumulator_dtype': 'bfloat16'})
  tx, _ = optim.make_optimizer(config, 10)
  (adam_state,) = [s for s in tx.init(_params())
                   if isinstance(s, optax.ScaleByAdamState)]
  assert adam_state.mu['dense']['kernel'].dtype == jnp.bfloat16
  assert adam_state.nu['dense']['kernel'].dtype == jnp.float32


def test_unknown_optimizer():
  with pytest.raises(ValueError, match=r"'lamb' not in \('sgd', 'adam', 'adamw'\)"):
    optim.check_config(_config(**{'optim.name': 'lamb'}))


# ------------------------------------------------------------------ loss
def test_label_smoothing_loss_by_hand():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  logp = np.log(np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum())
  targets = np.array([0.1 / 3, 1 - 0.1 + 0.1 / 3, 0.1 / 3])
  expected = -(targets * logp).sum()
  got = optim.cross_entropy_loss(logits, jnp.array([1]), 3, label_smoothing=0.1)
  assert float(got) == pytest.approx(expected, rel=1e-6)
  np.testing.assert_allclose(optim.one_hot_smoothed(jnp.array([1]), 3, 0.1),
                             targets[None], rtol=1e-6)


def test_masked_mean_loss_and_bf16_logits():
  logits = jnp.array([[5.0, 0.0], [0.0, 5.0], [9.0, -9.0]])
  labels = jnp.array([0, 0, 1])
  per_example = -jax.nn.log_softmax(logits)[jnp.arange(3), labels]
  got = optim.cross_entropy_loss(logits, labels, 2, mask=jnp.array([1, 1, 0]))
  assert float(got) == pytest.approx(float(per_example[:2].mean()), rel=1e-6)
  assert float(optim.cross_entropy_loss(logits, labels, 2, mask=jnp.zeros(3))) == 0.0
  bf16 = optim.cross_entropy_loss(logits.astype(jnp.bfloat16), labels, 2)
  assert bf16.dtype == jnp.float32
  assert float(bf16) == pytest.approx(float(per_example.mean()), rel=1e-2)


# ------------------------------------------------------------------ accumulation
def _mlp_loss(params, batch, rng):
  del rng
  hidden = jnp.tanh(batch['x'] @ params['w1'] + params['b1'])
  logits = hidden @ params['w2']
  loss = optim.cross_entropy_loss(logits, batch['y'], 3)
  return loss, {'acc': jnp.mean(jnp.argmax(logits, -1) == batch['y'])}


def test_accumulated_gradient_equals_full_batch():
  keys = jax.random.split(jax.random.key(0), 4)
  params = {'w1': jax.random.normal(keys[0], (5, 8)), 'b1': jnp.zeros(8),
            'w2': jax.random.normal(keys[1], (8, 3))}
  batch = {'x': jax.random.normal(keys[2], (16, 5)),
           'y': jax.random.randint(keys[3], (16,), 0, 3)}
  fn = jax.value_and_grad(_mlp_loss, has_aux=True)
  (full_loss, full_aux), full_grads = jax.jit(fn)(params, batch, None)
  accumulate = jax.jit(optim.accumulate_gradients, static_argnums=(0, 4))
  loss, aux, grads = accumulate(fn, params, batch, jax.random.key(1), 4)
  assert float(loss) == pytest.approx(float(full_loss), abs=1e-6)
  assert float(aux['acc']) == pytest.approx(float(full_aux['acc']), abs=1e-6)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, full_grads)
  loss1, _, grads1 = accumulate(fn, params, batch, jax.random.key(1), 1)
  assert float(loss1) == pytest.approx(float(full_loss), abs=1e-6)


def test_micro_batches_get_different_rngs():
  def fn(params, batch, rng):
    draw = jax.random.uniform(rng)
    return (jnp.sum(batch['x']) * 0.0, {'draw': draw}), params

  rng = jax.random.key(7)
  draws = [float(jax.random.uniform(jax.random.fold_in(rng, i))) for i in range(4)]
  assert len(set(draws)) == 4
  _, aux, _ = optim.accumulate_gradients(fn, jnp.zeros(()), {'x': jnp.ones((8, 2))},
                                         rng, 4)
  assert float(aux['draw']) == pytest.approx(np.mean(draws), rel=1e-6)


def test_accumulation_needs_divisible_batch():
  with pytest.raises(ValueError, match='10.*accum_steps 4'):
    optim.accumulate_gradients(None, {}, {'x': jnp.ones((10, 2))}, None, 4)
