"""Fourier and random-feature token mixers against numpy references."""

import math

import flax.linen as nn

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import favor
from vit_jax.models import fourier
from vit_jax.models.layers import MlpBlock


def _init_apply(module, x):
  # Jitted: one compile instead of one per op (these tests are about numbers).
  params = jax.jit(module.init)(jax.random.key(0), x)['params']
  return params, np.asarray(jax.jit(module.apply)({'params': params}, x))


@pytest.mark.parametrize('grid', [(4, 4), (5, 7), (3, 6)])
def test_global_filter_is_irfft2_of_rfft2_times_the_weight(grid):
  x = jax.random.normal(jax.random.key(1), (2, grid[0] * grid[1], 6))
  params, out = _init_apply(fourier.GlobalFilter(grid), x)
  weight = np.asarray(params['complex_weight'], np.float64)
  assert weight.shape == (grid[0], grid[1] // 2 + 1, 6, 2)
  freq = np.fft.rfft2(np.asarray(x, np.float64).reshape(2, *grid, 6),
                      axes=(1, 2), norm='ortho')
  want = np.fft.irfft2(freq * (weight[..., 0] + 1j * weight[..., 1]), s=grid,
                       axes=(1, 2), norm='ortho').reshape(2, -1, 6)
  np.testing.assert_allclose(out, want, atol=1e-5)


def _afno_numpy(x, p, grid, num_blocks, threshold, fraction):
  """The reference's real/imaginary formulation, written out in numpy."""
  batch, _, hidden = x.shape
  size = hidden // num_blocks
  f = np.fft.rfft2(x.reshape(batch, *grid, hidden), axes=(1, 2), norm='ortho')
  kept = int(f.shape[2] * fraction)
  f = f.reshape(batch, f.shape[1], f.shape[2], num_blocks, size)
  w1, b1, w2, b2 = (np.asarray(p[k], np.float64) for k in ('w1', 'b1', 'w2', 'b2'))
  mm = lambda a, w: np.einsum('...bi,bio->...bo', a, w)
  re, im = f.real[:, :, :kept], f.imag[:, :, :kept]
  h_re = np.maximum(mm(re, w1[0]) - mm(im, w1[1]) + b1[0], 0)
  h_im = np.maximum(mm(im, w1[0]) + mm(re, w1[1]) + b1[1], 0)
  o_re = np.zeros(f.shape)
  o_im = np.zeros(f.shape)
  o_re[:, :, :kept] = mm(h_re, w2[0]) - mm(h_im, w2[1]) + b2[0]
  o_im[:, :, :kept] = mm(h_im, w2[0]) + mm(h_re, w2[1]) + b2[1]
  shrink = lambda v: np.sign(v) * np.maximum(np.abs(v) - threshold, 0)
  o = (shrink(o_re) + 1j * shrink(o_im)).reshape(batch, f.shape[1], f.shape[2],
                                                 hidden)
  out = np.fft.irfft2(o, s=grid, axes=(1, 2), norm='ortho').reshape(x.shape)
  return out + x


@pytest.mark.parametrize('grid,factor,fraction', [
    ((4, 4), 1, 1.0), ((5, 7), 2, 0.5), ((3, 6), 1, 0.75)])
def test_afno_matches_the_reference_formulation(grid, factor, fraction):
  x = jax.random.normal(jax.random.key(2), (2, grid[0] * grid[1], 8))
  layer = fourier.AFNO2D(grid, num_blocks=2, sparsity_threshold=0.01,
                         hard_thresholding_fraction=fraction,
                         hidden_size_factor=factor)
  params, out = _init_apply(layer, x)
  assert params['w1'].shape == (2, 2, 4, 4 * factor)
  # The reference's init is 0.02 * N(0, 1): scale it up so that ReLU and the
  # soft-shrinkage both cut somewhere.
  params = jax.tree.map(lambda p: p * 25.0, params)
  out = np.asarray(jax.jit(layer.apply)({'params': params}, x))
  want = _afno_numpy(np.asarray(x, np.float64), params, grid, 2, 0.01, fraction)
  np.testing.assert_allclose(out, want, atol=1e-4)


def _block_parts(block, params):
  """The block's parts as separate modules, each applied with its own params."""
  part = lambda module, name: (
      lambda *args, **kw: module.apply({'params': params[name]}, *args, **kw))
  mixer = (fourier.GlobalFilter(block.grid) if block.token_mixer == 'global_filter'
           else fourier.AFNO2D(block.grid, num_blocks=block.afno_num_blocks))
  mixer_name = 'GlobalFilter_1' if block.token_mixer == 'global_filter' else 'AFNO2D_1'
  mlp = part(MlpBlock(block.mlp_dim), 'MlpBlock_3')
  return (part(nn.LayerNorm(epsilon=1e-6), 'LayerNorm_0'), part(mixer, mixer_name),
          part(nn.LayerNorm(epsilon=1e-6), 'LayerNorm_2'),
          lambda y: mlp(y, deterministic=True))


@pytest.mark.parametrize('mixer,double_skip', [
    ('global_filter', False), ('afno', True), ('afno', False)])
def test_fourier_block_residuals_follow_the_references(mixer, double_skip):
  x = jax.random.normal(jax.random.key(3), (2, 9, 8))
  block = fourier.FourierBlock(mlp_dim=16, grid=(3, 3), token_mixer=mixer,
                               afno_num_blocks=2, afno_double_skip=double_skip)
  params = jax.jit(block.init, static_argnums=2)(jax.random.key(0), x, True)['params']
  out = jax.jit(block.apply, static_argnums=2)({'params': params}, x, True)
  ln0, mix, ln2, mlp = _block_parts(block, params)
  if mixer == 'global_filter':  # x + MLP(LN(GF(LN(x)))): one residual.
    want = x + mlp(ln2(mix(ln0(x))))
  elif double_skip:  # y = x + AFNO(LN(x)); y + MLP(LN(y)).
    y = x + mix(ln0(x))
    want = y + mlp(ln2(y))
  else:
    want = x + mlp(ln2(mix(ln0(x))))
  np.testing.assert_allclose(out, want, atol=1e-5)


def test_fourier_mixers_refuse_tokens_that_are_not_the_grid():
  x = jnp.zeros((1, 10, 8))
  for layer in (fourier.GlobalFilter((3, 3)), fourier.AFNO2D((3, 3), num_blocks=2)):
    with pytest.raises(ValueError, match='10 tokens for a 3x3 grid'):
      layer.init(jax.random.key(0), x)


def _exact_attention(q, k, v):
  logits = np.einsum('blhd,bmhd->bhlm', q, k) / math.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum('bhlm,bmhd->blhd', weights, v)


@pytest.mark.parametrize('kernel', favor.FEATURE_KERNELS)
def test_favor_error_falls_with_the_feature_count(kernel):
  # Monte-Carlo features: the estimate's error scales like 1/sqrt(m), so 256x
  # more features should cut it ~16x; a mean over 6 seeds varies by ~10-15%,
  # so asking for half that fall (and a monotone trend) does not fail by
  # chance, but fails for a biased estimate whose error levels off: features
  # from a QR without the sign fix (non-uniform directions) fell only 5.5x.
  q, k, v = (0.5 * jax.random.normal(key, (1, 32, 2, 8))
             for key in jax.random.split(jax.random.key(4), 3))
  exact = _exact_attention(*(np.asarray(a, np.float64) for a in (q, k, v)))
  errors = []
  for m in (16, 256, 4096):
    estimate = jax.jit(lambda rng, m=m: jax.vmap(
        lambda r: favor.favor_attention(q, k, v, rng=r, num_features=m,
                                        kernel=kernel))(rng))
    trials = estimate(jax.random.split(jax.random.key(0), 6))
    errors.append(np.mean([np.sqrt(np.mean((np.asarray(t) - exact) ** 2))
                           for t in trials]))
  assert errors[0] > errors[1] > errors[2]
  assert errors[0] / errors[2] > 8, errors


def test_favor_stays_finite_where_features_would_underflow():
  # Logits of hundreds (|q|, |k| ~ 20 sigma): exp() of the raw features
  # under- and overflows, and with only a per-query and a global key shift
  # the normaliser of some queries was 0 (NaN output and gradient). With the
  # per-feature shift it is >= 1/m by construction.
  q, k, v = (20.0 * jax.random.normal(key, (1, 64, 1, 16))
             for key in jax.random.split(jax.random.key(1), 3))
  scale = 16 ** -0.25
  projection = favor.orthogonal_gaussian(jax.random.key(0), 64, 16)
  phi_q, phi_k = favor.feature_maps(q * scale, k * scale, projection, 'positive')
  normaliser = jnp.einsum('blhm,bhm->blh', phi_q, phi_k.sum(1))
  assert float(normaliser.min()) >= 1 / 64 * (1 - 1e-6)
  attend = lambda q: favor.favor_attention(q, k, v, rng=jax.random.key(0),
                                           num_features=64)
  out, grad = attend(q), jax.grad(lambda q: jnp.sum(attend(q)))(q)
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(grad))
  # Still a convex combination of the values, as attention is.
  assert float(jnp.max(out)) <= float(jnp.max(v)) + 1e-4


def test_orthogonal_features_are_orthogonal_within_a_block():
  w = np.asarray(favor.orthogonal_gaussian(jax.random.key(5), 20, 8))
  assert w.shape == (20, 8)
  unit = w / np.linalg.norm(w, axis=1, keepdims=True)
  for start in (0, 8):
    gram = unit[start:start + 8] @ unit[start:start + 8].T
    np.testing.assert_allclose(gram, np.eye(8), atol=1e-5)


def test_favor_keeps_the_softmax_params_and_draws_features_from_its_stream():
  x = jax.random.normal(jax.random.key(6), (2, 32, 32, 3))
  softmax = models.create_model('ViT-test_4', None, num_layers=1)
  performer = models.create_model('ViT-test_4', None, num_layers=1,
                                  attention_impl='favor', favor_features=64)
  params = jax.jit(softmax.init)(jax.random.key(0), x)['params']
  assert (jax.tree.structure(jax.eval_shape(performer.init, jax.random.key(0), x)[
      'params']) == jax.tree.structure(params))
  # Outside training (or with no `favor` stream) the features come from the
  # fixed seed: repeatable, and another seed gives another estimate.
  evaluate = jax.jit(lambda seed: performer.clone(favor_seed=seed).apply(
      {'params': params}, x), static_argnums=0)
  fixed = np.asarray(evaluate(0))
  # Eager, no rngs at all, one image: the same features (to rounding).
  np.testing.assert_allclose(
      np.asarray(performer.apply({'params': params}, x[:1])), fixed[:1], atol=1e-5)
  assert not np.array_equal(np.asarray(evaluate(1)), fixed)
  train_apply = jax.jit(lambda key: performer.apply(
      {'params': params}, x, train=True,
      rngs={'dropout': jax.random.key(0), 'favor': key}))
  train = lambda key: np.asarray(train_apply(key))
  np.testing.assert_array_equal(train(jax.random.key(7)), train(jax.random.key(7)))
  assert not np.array_equal(train(jax.random.key(7)), train(jax.random.key(8)))


def test_fourier_models_run_in_bfloat16_with_float32_ffts():
  x = jax.random.normal(jax.random.key(7), (2, 32, 32, 3))
  # One Fourier model: both mixers share the float32 FFT in and out.
  for name in ('AFNO-test_4',):
    model32 = models.create_model(name, None, num_layers=1)
    model16 = models.create_model(name, None, num_layers=1, precision='bfloat16')
    params = jax.jit(model32.init)(jax.random.key(0), x)['params']
    a = np.asarray(jax.jit(model32.apply)({'params': params}, x))
    b = np.asarray(jax.jit(model16.apply)({'params': params}, x))
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max() + 0.05, name


@pytest.mark.parametrize('overrides,message', [
    (dict(classifier='token'), 'cls token has no place in the frequency grid'),
    (dict(token_mixer='afno', afno_num_blocks=5), 'not divisible by afno_num_blocks 5'),
    (dict(token_mixer='afno', afno_hard_thresholding_fraction=0.0), r'\(0, 1\]'),
    (dict(token_mixer='fft'), 'token_mixer'),
])
def test_bad_mixer_settings_are_refused_before_tracing(overrides, message):
  with pytest.raises(ValueError, match=message):
    models.create_model('GFNet-test', 10, **overrides)


@pytest.mark.parametrize('overrides,message', [
    (dict(attention_impl='favor', favor_features=0), 'favor_features must be'),
    (dict(attention_impl='favor', favor_kernel='relu'), 'favor_kernel'),
    (dict(attention_impl='favor', attention_dropout_rate=0.1), 'must be 0 with FAVOR'),
    (dict(token_mixer='global_filter'), 'cls token'),
])
def test_bad_favor_settings_are_refused_before_tracing(overrides, message):
  with pytest.raises(ValueError, match=message):
    models.create_model('ViT-test_4', 10, **overrides)
