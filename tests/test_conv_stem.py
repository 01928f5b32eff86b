"""Convolutional stem (`model.conv_stem`): the conv, the stages, the ViT around them."""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart
from vit_jax import checkpoint
from vit_jax import models
from vit_jax.models.conv_stem import ConvStem
from vit_jax.models.conv_stem import conv3x3
from vit_jax.models.conv_stem import conv_stem_grid


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('height,width', [(28, 28), (7, 9), (32, 17), (1, 2)])
def test_im2col_conv_is_the_same_conv(height, width, stride):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, height, width, 3)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
  xla_conv = lambda x, k: lax.conv_general_dilated(
      x, k, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ours = lambda x, k: conv3x3(x, k, stride)
  got, want = ours(jnp.asarray(x), jnp.asarray(kernel)), xla_conv(x, kernel)
  assert got.shape == want.shape == (
      2, -(-height // stride), -(-width // stride), 5)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The kernel gradient too: it is what trains.
  grad = lambda conv: jax.grad(lambda k: jnp.sum(jnp.sin(conv(x, k))))(kernel)
  np.testing.assert_allclose(grad(ours), grad(xla_conv), atol=1e-4)


def _numpy_layer(x, kernel, scale, bias, stride):
  """conv 3x3 SAME at `stride` (explicit loops) -> LayerNorm(eps 1e-6) -> ReLU, float64."""
  b, h, w, c = x.shape
  oh, ow = -(-h // stride), -(-w // stride)
  pad_h = max(stride * (oh - 1) + 3 - h, 0)
  pad_w = max(stride * (ow - 1) + 3 - w, 0)
  xp = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                  (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
  y = np.zeros((b, oh, ow, kernel.shape[-1]))
  for i in range(oh):
    for j in range(ow):
      window = xp[:, stride * i:stride * i + 3, stride * j:stride * j + 3, :]
      y[:, i, j] = np.einsum('bhwc,hwco->bo', window, kernel)
  y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-6)
  return np.maximum(y * scale + bias, 0.0)


@pytest.mark.parametrize('depth', [1, 3])
def test_stem_matches_numpy_oracle(depth):
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (2, 11, 11, 1)).astype(np.float32)
  stem = ConvStem((4, 6), depth)
  params = stem.init(jax.random.key(0), images)['params']
  params = jax.tree.map(
      lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  got = stem.apply({'params': params}, images)
  want = images.astype(np.float64)
  names = []
  for i in range(2):
    for j in range(depth):
      name = f'{i}_{j}' if j else f'{i}'
      names.append(name)
      want = _numpy_layer(want, params[f'conv_{name}']['kernel'],
                          params[f'norm_{name}']['scale'],
                          params[f'norm_{name}']['bias'], 1 if j else 2)
  # Stage i's stride-2 layer keeps the depth-1 name conv_{i}; no other params.
  assert sorted(params) == sorted([f'conv_{n}' for n in names] +
                                  [f'norm_{n}' for n in names])
  assert got.shape == (2, 3, 3, 6)  # 11 -> 6 -> 3, whatever the depth.
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_stem_depth_must_be_positive():
  with pytest.raises(ValueError, match='conv_stem_depth must be >= 1, got 0'):
    ConvStem((4,), 0).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


def test_vit_with_conv_stem_params_and_tokens():
  model = models.create_model('ViT-test_4', 10, conv_stem=(8, 16),
                              conv_stem_depth=2, patch_size=(1, 1))
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 28, 28, 1))))['params']
  shapes = {'/'.join(k.key for k in path): v.shape
            for path, v in jax.tree_util.tree_leaves_with_path(params)}
  assert shapes['conv_stem/conv_0/kernel'] == (3, 3, 1, 8)
  assert shapes['conv_stem/conv_1/kernel'] == (3, 3, 8, 16)
  assert shapes['conv_stem/norm_1/scale'] == (16,)
  assert shapes['conv_stem/conv_0_1/kernel'] == (3, 3, 8, 8)    # Stride-1 layers.
  assert shapes['conv_stem/conv_1_1/kernel'] == (3, 3, 16, 16)
  assert shapes['embedding/kernel'] == (1, 1, 16, 32)   # The paper's final 1x1 conv.
  # 28 -> 14 -> 7: 49 tokens plus cls.
  assert shapes['Transformer/posembed_input/pos_embedding'] == (1, 50, 32)


def test_vit_with_conv_stem_trains():
  model = models.create_model('ViT-test_4', 10, conv_stem=(8,), patch_size=(2, 2))
  images = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  # Jitted: one compile, not one per op of an eager forward and backward.
  params = jax.tree.map(lambda p: p + 0.01,
                        jax.jit(model.init)(jax.random.key(0), images)['params'])
  grads = jax.jit(jax.grad(
      lambda p: jnp.mean(model.apply({'params': p}, images) ** 2)))(params)
  stem_grads = jax.tree.leaves(grads['conv_stem'])
  assert all(np.all(np.isfinite(g)) for g in stem_grads)
  assert all(float(jnp.abs(g).sum()) > 0 for g in stem_grads)


def test_image_sizes_are_checked_on_the_stem_grid():
  assert [conv_stem_grid(28, n) for n in range(4)] == [28, 14, 7, 4]
  good = models.get_model_config('ViT-test_4')
  good.update(conv_stem=(8, 8, 8), patch_size=(2, 2))  # 28 -> 4x4 grid.
  models.check_image_size(good, 28)
  bad = models.get_model_config('ViT-test_4')
  bad.update(conv_stem=(8, 8), patch_size=(2, 2))
  with pytest.raises(ValueError, match=r'image size 28 becomes a 7x7 grid .*2-stage '
                     r'conv_stem.*patch size 2x2'):
    models.check_image_size(bad, 28)
  with pytest.raises(ValueError, match='resnet stem or a conv_stem, not both'):
    models.create_model('R-test+ViT-test', 10, conv_stem=(8,)).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_conv_stem_is_a_config_field_and_survives_npz(tmp_path):
  config = quickstart.get_config()
  config.unlock()
  config.model.conv_stem = (4, 8)
  config.model.patch_size = (1, 1)
  model = models.create_model(config.model, 10)
  images = jnp.zeros((1, 28, 28, 1))
  params = jax.jit(model.init)(jax.random.key(0), images)['params']
  path = str(tmp_path / 'stem.npz')
  checkpoint.save_npz(path, params)
  loaded = checkpoint.load_npz(path)
  np.testing.assert_array_equal(loaded['conv_stem']['conv_1']['kernel'],
                                params['conv_stem']['conv_1']['kernel'])
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply({'params': loaded}, images),
                             apply({'params': params}, images))
