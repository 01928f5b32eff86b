"""The token-mixer families in training, fine-tuning and the tools' plumbing."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tiny import step_config
from vit_jax import checkpoint
from vit_jax import config_checks
from vit_jax import models
from vit_jax import optim
from vit_jax import steps
from vit_jax.checkpoint import posemb
from vit_jax.checkpoint import pretrained

FAMILIES = {
    'gfnet': ('GFNet-test', {}),
    'afno': ('AFNO-test_4', {}),
    'favor': ('ViT-test_4-gap', dict(attention_impl='favor', favor_features=16)),
}
IMAGE_SHAPE = (16, 16, 3)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.uniform(-1, 1, (16, *IMAGE_SHAPE)).astype(np.float32),
          'label': rng.integers(0, 10, 16).astype(np.int32)}


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_each_family_learns_a_fixed_batch(family):
  name, overrides = FAMILIES[family]
  model = models.create_model(name, 10, **overrides)
  tx, _ = optim.make_optimizer(step_config(schedule={'base_lr': 3e-3}), 20)
  state = jax.jit(lambda: steps.create_train_state(model, tx, IMAGE_SHAPE, 0))()
  step = jax.jit(steps.make_train_step(model, tx, num_classes=10))
  batch = _batch()
  losses = []
  for _ in range(12):
    state, metrics = step(state, batch)
    losses.append(float(metrics['train_loss']))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.9 * losses[0], losses  # ln(10) = 2.30 at the start.


def test_favor_features_are_a_pure_function_of_the_state_and_step():
  # Exact resume needs the random features to come from the saved state (its
  # rng and step), never from anything a restart would lose.
  name, overrides = FAMILIES['favor']
  model = models.create_model(name, 10, **overrides)
  tx, _ = optim.make_optimizer(step_config(), 20)
  state = jax.jit(lambda: steps.create_train_state(model, tx, IMAGE_SHAPE, 0))()
  # A non-zero head, so that the loss sees what the encoder computes.
  rng = np.random.default_rng(1)
  state = state.replace(params=jax.tree.map(
      lambda p: p + 0.1 * rng.normal(size=p.shape).astype(p.dtype), state.params))
  step = jax.jit(steps.make_train_step(model, tx, num_classes=10))
  batch = _batch()
  first, _ = step(state, batch)
  again, _ = step(state, batch)
  for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(a, b)
  # The step does draw features: the same params and batch at another step
  # number give another loss (the model has no dropout, so only FAVOR+ moves).
  _, at_0 = step(state, batch)
  _, at_5 = step(state.replace(step=state.step + 5), batch)
  assert float(at_0['train_loss']) != float(at_5['train_loss'])


_FAVOR_TRAIN_STEPS = """
import jax, jax.numpy as jnp
from vit_jax import models
model = models.create_model('ViT-Ti_16-gap', 10, attention_impl='favor', num_layers=4)
x = jnp.ones((2, 32, 32, 3))
params = jax.jit(model.init)(jax.random.key(0), x)['params']
loss = lambda p, key: jnp.mean(model.apply({'params': p}, x, train=True,
                                           rngs={'favor': key}) ** 2)
grad = jax.jit(jax.grad(loss))
for i in range(2):
  jax.block_until_ready(grad(params, jax.random.key(i)))
print('trained')
"""


def test_favor_training_does_not_deadlock_xla_cpu():
  # Random features redrawn in every step through jnp.linalg.qr (LAPACK)
  # deadlocked XLA:CPU's concurrency-optimised scheduler with this shape (4
  # layers of head_dim 64, m = 256): the step never returned. In a subprocess
  # with a deadline, so that a regression fails instead of hanging the suite.
  proc = subprocess.run([sys.executable, '-c', _FAVOR_TRAIN_STEPS],
                        capture_output=True, text=True, timeout=240,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0 and 'trained' in proc.stdout, proc.stderr[-2000:]


def _gfnet_params(size):
  model = models.create_model('GFNet-test', 10)
  images = np.zeros((1, size, size, 3), np.float32)
  return model, jax.jit(model.init)(jax.random.key(size), images)['params']


def test_gfnet_filters_are_resized_with_the_position_embedding():
  _, source = _gfnet_params(20)  # 5x5 grid: filters [5, 3, c, 2].
  model, init = _gfnet_params(36)  # 9x9 grid: filters [9, 5, c, 2].
  params, report = checkpoint.load_pretrained(source, init)
  name = 'Transformer/encoderblock_0/GlobalFilter_1/complex_weight'
  assert report.resized[name] == ((5, 3, 32, 2), (9, 5, 32, 2))
  assert name not in report.loaded  # Reported once, as resized.
  assert 'Transformer/posembed_input/pos_embedding' in report.resized
  old = np.asarray(source['Transformer']['encoderblock_0']['GlobalFilter_1']
                   ['complex_weight'])
  new = params['Transformer']['encoderblock_0']['GlobalFilter_1']['complex_weight']
  # Corner-aligned (align_corners=True) bicubic 5 -> 9 rows, 3 -> 5 columns:
  # every other new sample sits on an old one and copies it...
  np.testing.assert_allclose(new[::2, ::2], old, rtol=1e-6, atol=1e-7)
  # ... and one halfway between old rows 0 and 1 is the cubic convolution
  # (a = -0.75) of rows -1 (the edge, replicated), 0, 1 and 2.
  taps = np.array([-0.09375, 0.59375, 0.59375, -0.09375])
  want = np.tensordot(taps, old[[0, 0, 1, 2]], axes=1)
  np.testing.assert_allclose(new[1, ::2], want, rtol=1e-5, atol=1e-6)
  logits = model.apply({'params': params}, np.zeros((2, 36, 36, 3), np.float32))
  assert logits.shape == (2, 10)


def test_filter_resize_none_refuses_another_grid():
  _, source = _gfnet_params(20)
  _, init = _gfnet_params(36)
  with pytest.raises(ValueError, match=r"global filter .*complex_weight.*"
                     r"filter_resize is 'none'"):
    checkpoint.load_pretrained(source, init, filter_resize='none')
  same, _ = checkpoint.load_pretrained(source, _gfnet_params(20)[1],
                                       filter_resize='none')
  assert same['Transformer']['encoderblock_1']['GlobalFilter_1'][
      'complex_weight'].shape == (5, 3, 32, 2)


def test_filter_resize_is_a_checked_config_key():
  config = step_config(pretrained={'filter_resize': 'nearest'})
  with pytest.raises(config_checks.ConfigError, match='filter_resize'):
    pretrained.check_config(config)
  assert set(pretrained.FILTER_RESIZE) == {'bicubic', 'none'}
  assert posemb.resize_global_filter(np.ones((4, 3, 2, 2)), (4, 4)).shape == (4, 3, 2, 2)
