"""Scanned encoder blocks, rematerialisation, bf16 and fused attention.

`scan_layers` and `remat_policy` change how the encoder compiles, never what it
computes: every test here converts params between the stacked and per-block
layouts and checks the numbers agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from tiny import tiny_config
from vit_jax import checkpoint
from vit_jax import config_checks
from vit_jax import models
from vit_jax import optim
from vit_jax import run_setup
from vit_jax import steps
from vit_jax.checkpoint import layouts
from vit_jax.models.vit import REMAT_POLICIES

LAYERS = 2
IMAGES = np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)


def _model(name='ViT-test_4', **overrides):
  return models.create_model(name, 10, num_layers=LAYERS, **overrides)


def _random_params(model, seed=0):
  """Per-block params with every leaf random (a zero head hides gradients)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), IMAGES[:1])['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: (rng.normal(size=s.shape) * 0.3).astype(np.float32), shapes)


def _logits(model, params, images=IMAGES):
  """Eval-mode logits, compiled (faster than op-by-op for these tests)."""
  return jax.jit(model.apply)({'params': params}, images)


def _grads(model, params, *, train=False, seed=1):
  def loss(p):
    # 'rbg' keys compile far faster on CPU than threefry's unrolled rounds.
    logits = model.apply({'params': p}, IMAGES, train=train,
                         rngs={'dropout': jax.random.key(seed, impl='rbg')})
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0])
  return jax.jit(jax.grad(loss))(params)


def _assert_close(a, b, atol):
  flat_a, flat_b = (layouts.flatten_params(t) for t in (a, b))
  assert flat_a.keys() == flat_b.keys()
  for name in flat_a:
    np.testing.assert_allclose(flat_a[name], flat_b[name], atol=atol, rtol=0,
                               err_msg=name)


@pytest.fixture(scope='module')
def unrolled_params():
  return _random_params(_model())


# ------------------------------------------------------------------ layout


def test_scanned_params_are_the_stacked_per_block_params(unrolled_params):
  scanned = jax.eval_shape(_model(scan_layers=True).init, jax.random.key(0),
                           IMAGES[:1])['params']
  stacked = layouts.stack_encoder_blocks(unrolled_params)
  assert jax.tree.map(np.shape, stacked) == jax.tree.map(lambda s: s.shape, scanned)
  blocks = scanned['Transformer']['encoderblock']
  assert blocks['MultiHeadDotProductAttention_1']['query']['kernel'].shape == (
      LAYERS, 32, 2, 16)
  assert not any(k.startswith('encoderblock_') for k in scanned['Transformer'])
  np.testing.assert_array_equal(
      stacked['Transformer']['encoderblock']['MlpBlock_3']['Dense_1']['kernel'][1],
      unrolled_params['Transformer']['encoderblock_1']['MlpBlock_3']['Dense_1'][
          'kernel'])
  _assert_close(layouts.unstack_encoder_blocks(stacked), unrolled_params, 0)
  assert layouts.is_scanned(stacked)
  assert not layouts.is_scanned(unrolled_params)


def test_stacking_refuses_blocks_that_differ(unrolled_params):
  flat = layouts.flatten_params(unrolled_params)
  del flat['Transformer/encoderblock_1/LayerNorm_0/bias']
  with pytest.raises(ValueError, match='encoderblock_1 differs'):
    layouts.stack_encoder_blocks(flat)
  flat = layouts.flatten_params(unrolled_params)
  flat = {k.replace('encoderblock_1/', 'encoderblock_5/'): v for k, v in flat.items()}
  with pytest.raises(ValueError, match='without gaps'):
    layouts.stack_encoder_blocks(flat)


# ------------------------------------------------------------------ numerics


@pytest.mark.parametrize('name,overrides', [
    ('ViT-test_4', dict(classifier='token')), ('ViT-test_4', dict(classifier='map')),
    ('ViT-test_4', dict(attention_impl='favor', favor_features=8)),
    ('GFNet-test', {}), ('AFNO-test_4', dict(classifier='map'))])
def test_scan_forward_equals_unrolled(name, overrides):
  unrolled = _model(name, **overrides)
  params = _random_params(unrolled)
  scanned = _model(name, scan_layers=True, **overrides)
  want = _logits(unrolled, params)
  got = _logits(scanned, layouts.stack_encoder_blocks(params))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_scan_gradients_equal_unrolled(unrolled_params):
  want = _grads(_model(), unrolled_params)
  got = _grads(_model(scan_layers=True),
               layouts.stack_encoder_blocks(unrolled_params))
  assert layouts.is_scanned(got)
  _assert_close(layouts.unstack_encoder_blocks(got), want, atol=1e-5)


# Dropout and stochastic depth on: recomputation must replay the same masks.
_NOISY = dict(dropout_rate=0.1, attention_dropout_rate=0.1, stochastic_depth=0.3)


@pytest.fixture(scope='module')
def grads_without_remat(unrolled_params):
  """scan_layers -> (params, gradients) of the model without remat."""
  out = {}
  for scan in (False, True):
    params = (layouts.stack_encoder_blocks(unrolled_params) if scan
              else unrolled_params)
    out[scan] = params, _grads(_model(scan_layers=scan, **_NOISY), params,
                               train=True)
  return out


@pytest.mark.parametrize('scan,policy', [(False, 'full'), (True, 'dots_saveable')])
def test_remat_policies_give_the_same_gradients(grads_without_remat, scan, policy):
  params, want = grads_without_remat[scan]
  got = _grads(_model(scan_layers=scan, remat_policy=policy, **_NOISY), params,
               train=True)
  _assert_close(got, want, atol=1e-6)


@pytest.mark.parametrize('policy', REMAT_POLICIES)
def test_every_remat_policy_traces_a_gradient(unrolled_params, policy):
  # Tracing only (no compile): each name maps to a policy jax.checkpoint takes.
  model = _model(scan_layers=True, remat_policy=policy)
  params = layouts.stack_encoder_blocks(unrolled_params)
  grads = jax.eval_shape(jax.grad(lambda p: model.apply(
      {'params': p}, IMAGES).sum()), params)
  assert jax.tree.map(lambda g: g.shape, grads) == jax.tree.map(np.shape, params)


def test_scan_draws_different_dropout_per_layer_and_linear_stochastic_depth():
  three = dict(num_layers=3, dropout_rate=0.5, stochastic_depth=0.8)
  model = models.create_model('ViT-test_4', 10, scan_layers=True, **three)
  params = layouts.stack_encoder_blocks(_random_params(
      models.create_model('ViT-test_4', 10, **three)))
  images = np.tile(IMAGES, (8, 1, 1, 1))  # 64 examples for the drop rates.
  _, state = model.apply({'params': params}, images, train=True,
                         rngs={'dropout': jax.random.key(3, impl='rbg')},
                         capture_intermediates=True, mutable=['intermediates'])
  block = state['intermediates']['Transformer']['encoderblock']
  # Dropout after the MLP's first Dense: [layers, batch, tokens, mlp_dim].
  kept = np.asarray(block['MlpBlock_3']['Dropout_0']['__call__'][0]) != 0
  assert kept.shape[0] == 3
  assert 0.4 < kept.mean() < 0.6
  assert (kept[0] != kept[1]).mean() > 0.3  # Independent masks, not one reused.
  # Stochastic depth on the attention branch: rates 0, 0.4, 0.8 by layer.
  branch = np.asarray(block['DropPath_0']['__call__'][0])
  dropped = np.all(branch == 0, axis=(2, 3)).mean(axis=1)  # Per layer.
  assert dropped[0] == 0
  assert 0.2 < dropped[1] < 0.6 and 0.65 < dropped[2] < 0.95


def test_sown_attention_weights_are_stacked_by_layer(unrolled_params):
  _, unrolled = _model().apply({'params': unrolled_params}, IMAGES,
                               mutable=['intermediates'])
  _, scanned = _model(scan_layers=True, remat_policy='full').apply(
      {'params': layouts.stack_encoder_blocks(unrolled_params)}, IMAGES,
      mutable=['intermediates'])
  stacked = scanned['intermediates']['Transformer']['encoderblock'][
      'MultiHeadDotProductAttention_1']['attention_weights'][0]
  assert stacked.shape == (LAYERS, 8, 2, 17, 17)
  for i in range(LAYERS):
    np.testing.assert_allclose(
        stacked[i], unrolled['intermediates']['Transformer'][f'encoderblock_{i}'][
            'MultiHeadDotProductAttention_1']['attention_weights'][0], atol=1e-6)


# ------------------------------------------------------------------ files


def test_npz_round_trip_scanned_to_released_to_scanned(tmp_path, unrolled_params):
  stacked = layouts.stack_encoder_blocks(unrolled_params)
  path = tmp_path / 'scanned.npz'
  checkpoint.save_npz(path, stacked)
  with np.load(path) as npz:
    names = set(npz.files)
  assert names == set(layouts.flatten_params(unrolled_params))  # Released names.
  loaded = checkpoint.load_npz(path)
  _assert_close(loaded, unrolled_params, 0)
  _assert_close(layouts.stack_encoder_blocks(loaded), stacked, 0)


def test_load_pretrained_puts_a_released_file_into_a_scanned_model(
    tmp_path, unrolled_params):
  path = tmp_path / 'released.npz'
  checkpoint.save_npz(path, unrolled_params)  # 10 classes.
  scanned = models.create_model('ViT-test_4', 4, num_layers=LAYERS, scan_layers=True)
  init = jax.jit(scanned.init)(jax.random.key(1), IMAGES[:1])['params']
  params, report = checkpoint.load_pretrained(path, init, log=lambda _: None)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, init)
  assert 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel' in report.loaded
  assert sorted(report.reinitialised) == ['head/bias', 'head/kernel']
  unrolled = models.create_model('ViT-test_4', 4, num_layers=LAYERS)
  features = dict(layouts.unstack_encoder_blocks(params),
                  head={'kernel': np.ones((32, 4), np.float32),
                        'bias': np.zeros(4, np.float32)})
  want = _logits(unrolled, features)
  got = _logits(scanned, layouts.stack_encoder_blocks(features))
  np.testing.assert_allclose(got, want, atol=1e-5)
  # A workdir tree of a scanned model loads into an unrolled one as well.
  back, _ = checkpoint.load_pretrained(params, features, log=lambda _: None)
  _assert_close(back, features, 0)


def test_match_block_layout_follows_the_model(unrolled_params):
  abstract = jax.eval_shape(_model(scan_layers=True).init, jax.random.key(0),
                            IMAGES[:1])['params']
  stacked = layouts.match_block_layout(unrolled_params, abstract)
  assert layouts.is_scanned(stacked)
  _assert_close(layouts.match_block_layout(stacked, unrolled_params),
                unrolled_params, 0)


# ------------------------------------------------------------------ training


def test_train_step_with_scan_and_remat_matches_unrolled(unrolled_params):
  config = common.get_config()
  config.optim.name = 'sgd'
  config.schedule.base_lr = 0.1
  config.schedule.warmup_steps = 0
  tx, _ = optim.make_optimizer(config, total_steps=10)
  batch = {'image': IMAGES, 'label': np.arange(8, dtype=np.int32)}

  def one_step(model, params):
    zero = lambda: jnp.zeros((), jnp.int32)
    state = steps.TrainState(
        step=zero(), params=params, opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(0)), first_nonfinite_step=zero(),
        nonfinite_steps=zero())
    state, metrics = jax.jit(steps.make_train_step(model, tx, num_classes=10))(
        state, batch)
    assert np.isfinite(float(metrics['train_loss']))
    return jax.device_get(state.params)

  want = one_step(_model(), unrolled_params)
  got = one_step(_model(scan_layers=True, remat_policy='full'),
                 layouts.stack_encoder_blocks(unrolled_params))
  _assert_close(layouts.unstack_encoder_blocks(got), want, atol=1e-5)


# ------------------------------------------------------------------ config


def test_bad_remat_policy_is_refused_before_compile(tmp_path):
  with pytest.raises(ValueError, match=r"remat_policy 'bogus' not in .*dots_saveable"):
    models.create_model('ViT-test_4', 10, remat_policy='bogus')
  config = tiny_config(tmp_path)
  config.model.remat_policy = 'checkpoint_everything'
  with pytest.raises(config_checks.ConfigError, match='remat_policy'):
    run_setup.check_config(config)
  config.model.remat_policy = 'dots_saveable'
  config.model.scan_layers = True
  run_setup.check_config(config)  # Valid settings pass.
  model = models.create_model(config.model, 10)
  assert model.scan_layers and model.remat_policy == 'dots_saveable'
  with pytest.raises(TypeError):
    config.model.scan_layers = 'yes'  # Typed field: only bools.


# ------------------------------------------------------------------ dtypes, kernels


@pytest.mark.parametrize('scan', [False, True])
def test_fused_attention_equals_xla_in_float32(unrolled_params, scan):
  params = (layouts.stack_encoder_blocks(unrolled_params) if scan
            else unrolled_params)
  xla = _logits(_model(scan_layers=scan), params)
  fused = _logits(_model(scan_layers=scan, attention_impl='fused'), params)
  np.testing.assert_allclose(fused, xla, atol=1e-5, rtol=1e-5)


def test_bfloat16_scanned_logits_stay_close_to_float32(unrolled_params):
  params = layouts.stack_encoder_blocks(unrolled_params)
  f32 = _logits(_model(scan_layers=True), params)
  bf16_model = _model(scan_layers=True, precision='bfloat16', remat_policy='full')
  bf16 = _logits(bf16_model, params)
  assert bf16.dtype == jnp.float32
  init = jax.eval_shape(bf16_model.init, jax.random.key(0), IMAGES[:1])['params']
  assert {np.dtype(x.dtype) for x in jax.tree.leaves(init)} == {np.dtype('float32')}
  scale = float(jnp.abs(f32).max())
  assert 0 < float(jnp.abs(f32 - bf16).max()) < 0.05 * scale
