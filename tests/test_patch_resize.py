"""Patch-size resizing on load (FlexiViT's PI-resize): the tokens it keeps, the
least-squares kernel for a smaller patch, the options, the refusals."""

import functools
import logging

import jax
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import config_keys
from vit_jax import metrics
from vit_jax import models
from vit_jax import trainer
from vit_jax.checkpoint import pretrained
from vit_jax.checkpoint.patch_resize import bilinear_matrix
from vit_jax.checkpoint.patch_resize import resize_patch_kernel
from vit_jax.config_checks import ConfigError
from vit_jax.models.vit import PatchEmbedding

from tiny import step_config
from tiny import tiny_config

KERNEL = 'embedding/kernel'
POSEMB = 'Transformer/posembed_input/pos_embedding'


def resize(x, new_hw):
  """The documented operator on [n, h, w, c]: each (h, w) map resized alone."""
  n, _, _, c = x.shape
  return np.asarray(jax.image.resize(np.asarray(x, np.float32), (n, *new_hw, c),
                                     'bilinear', antialias=False), np.float64)


def operator_matrix(old_hw, new_hw):
  """B [nh*nw, ph*pw]: the operator applied to each basis patch of R^{ph*pw}."""
  size = old_hw[0] * old_hw[1]
  basis = np.eye(size).reshape(size, *old_hw, 1)
  return resize(basis, new_hw).reshape(size, -1).T


def tokens(patches, kernel):
  """<x, w> per output feature: [n, ph, pw, c] x [ph, pw, c, d] -> [n, d]."""
  return np.einsum('nhwc,hwcd->nd', patches, np.asarray(kernel, np.float64))


def patchwise_upsample(images, patch, factor):
  """Each patch of `images` [b, H, W, c] resized alone by `factor`."""
  b, height, width, c = images.shape
  (ph, pw), (gh, gw) = patch, (height // patch[0], width // patch[1])
  patches = images.reshape(b, gh, ph, gw, pw, c).transpose(0, 1, 3, 2, 4, 5)
  big = resize(patches.reshape(-1, ph, pw, c), (ph * factor, pw * factor))
  big = big.reshape(b, gh, gw, ph * factor, pw * factor, c)
  return big.transpose(0, 1, 3, 2, 4, 5).reshape(
      b, height * factor, width * factor, c).astype(np.float32)


@functools.cache
def vit_params(patch, image_size, seed, conv_stem=()):
  """(model, params) of a one-block ViT-test (hidden 32) with `patch` x `patch`
  patches; random values of the init's shapes (nothing compiles; cached: the
  tests only read them)."""
  model = models.create_model('ViT-test_4', None, patch_size=(patch, patch),
                              num_layers=1, conv_stem=conv_stem)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)['params']
  rng = np.random.default_rng(seed)
  return model, jax.tree.map(
      lambda x: rng.normal(0, 0.5, x.shape).astype(x.dtype), shapes)


def features_and_tokens(model, params, images):
  """The pooled features [b, hidden] and the patch embedding's output
  [b, gh, gw, hidden]."""
  def apply(params, images):
    return model.apply({'params': params}, images, capture_intermediates=
                       lambda module, _: isinstance(module, PatchEmbedding))
  features, state = jax.jit(apply)(params, images)
  return (np.asarray(features),
          np.asarray(state['intermediates']['embedding']['__call__'][0]))


# ----------------------------------------------------------------- operator
@pytest.mark.parametrize('old,new', [((4, 4), (8, 8)), ((3, 5), (7, 12)),
                                     ((8, 8), (4, 4)), ((7, 6), (5, 4))])
def test_the_operator_is_jax_bilinear_without_antialiasing(old, new):
  matrix = np.kron(bilinear_matrix(old[0], new[0]), bilinear_matrix(old[1], new[1]))
  np.testing.assert_allclose(matrix, operator_matrix(old, new), atol=1e-6)


# -------------------------------------------------------------- larger patch
@pytest.mark.parametrize('old,new', [((4, 4), (8, 8)), ((3, 4), (6, 10))])
def test_pi_resize_keeps_the_tokens_of_upsampled_patches(old, new):
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(*old, 3, 5)).astype(np.float32)
  patches = rng.normal(size=(50, *old, 3))
  resized = resize_patch_kernel(kernel, new)
  assert resized.shape == (*new, 3, 5) and resized.dtype == np.float32
  np.testing.assert_allclose(tokens(resize(patches, new), resized),
                             tokens(patches, kernel), atol=1e-4)


def test_a_16px_4x4_checkpoint_in_an_8x8_model_gives_the_same_tokens():
  """/4 at 16 px -> /8 at 32 px: the grid (and posemb) stays 4x4, and the
  image upsampled patch by patch gives the /4 model's tokens and features."""
  small, source = vit_params(4, 16, seed=1)
  big, init = vit_params(8, 32, seed=2)
  params, report = checkpoint.load_pretrained(source, init, log=lambda _: None)
  assert report.resized == {KERNEL: ((4, 4, 3, 32), (8, 8, 3, 32))}
  assert POSEMB in report.loaded
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  upsampled = patchwise_upsample(images, (4, 4), 2)
  # Resizing the whole image instead mixes pixels of neighbouring patches at
  # their borders (half-pixel taps cross them): the identity is per patch.
  whole = resize(images, (32, 32)).astype(np.float32)
  want_features, want = features_and_tokens(small, source, images)
  features, got = features_and_tokens(big, params, np.concatenate([upsampled, whole]))
  np.testing.assert_allclose(got[:2], want, atol=1e-4)
  np.testing.assert_allclose(features[:2], want_features, atol=1e-4)
  assert np.abs(got[2:] - want).max() > 0.1


# ------------------------------------------------------------- smaller patch
def test_a_smaller_patch_gets_the_least_squares_kernel():
  """8x8 -> 4x4: no kernel keeps every token; B^T w' is the projection of w
  onto the span of B^T, the best the 4x4 patch can do."""
  kernel = np.random.default_rng(1).normal(size=(8, 8, 2, 3))
  resized = resize_patch_kernel(kernel, (4, 4))
  b_t = operator_matrix((8, 8), (4, 4)).T  # [64, 16]
  w, fitted = kernel.reshape(64, 6), b_t @ resized.reshape(16, 6)
  projection = b_t @ np.linalg.pinv(b_t)
  np.testing.assert_allclose(fitted, projection @ w, atol=1e-5)
  np.testing.assert_allclose(b_t.T @ (fitted - w), 0.0, atol=1e-5)  # Normal eqs.
  assert np.abs(fitted - w).max() > 0.1  # Not exact: 64 weights from 16.


def test_a_smaller_patch_loads_through_load_pretrained():
  _, source = vit_params(8, 16, seed=1)
  _, init = vit_params(4, 8, seed=2)  # Grid 2x2: the posemb is resized too.
  params, report = checkpoint.load_pretrained(source, init, log=lambda _: None)
  np.testing.assert_allclose(params['embedding']['kernel'],
                             resize_patch_kernel(source['embedding']['kernel'], (4, 4)))
  assert report.resized == {KERNEL: ((8, 8, 3, 32), (4, 4, 3, 32))}


# ------------------------------------------------------------------ options
def test_bilinear_resizes_the_kernel_and_does_not_keep_the_tokens():
  kernel = np.random.default_rng(2).normal(size=(4, 4, 3, 5)).astype(np.float32)
  plain = resize_patch_kernel(kernel, (8, 8), 'bilinear')
  np.testing.assert_allclose(
      plain, jax.image.resize(kernel, (8, 8, 3, 5), 'bilinear', antialias=False),
      atol=1e-6)
  assert np.abs(plain - resize_patch_kernel(kernel, (8, 8))).max() > 0.1
  flat = np.ones((1, 4, 4, 3))  # A flat patch's token grows by the area, 4x.
  np.testing.assert_allclose(tokens(resize(flat, (8, 8)), plain),
                             4 * tokens(flat, kernel), rtol=1e-5)
  _, source = vit_params(4, 16, seed=1)
  _, init = vit_params(8, 32, seed=2)
  params, _ = checkpoint.load_pretrained(source, init, patch_resize='bilinear',
                                         log=lambda _: None)
  np.testing.assert_allclose(
      params['embedding']['kernel'],
      resize_patch_kernel(source['embedding']['kernel'], (8, 8), 'bilinear'))


def test_none_refuses_another_patch_size_naming_both():
  _, source = vit_params(4, 16, seed=1)
  _, init = vit_params(8, 32, seed=2)
  with pytest.raises(ValueError, match=r"embedding/kernel has patch size \(4, 4\) "
                     r"vs \(8, 8\) .*config.pretrained.patch_resize is 'none'"):
    checkpoint.load_pretrained(source, init, patch_resize='none')
  with pytest.raises(ValueError, match='not in'):
    resize_patch_kernel(source['embedding']['kernel'], (8, 8), 'nearest')


def test_a_model_with_a_stem_refuses_patch_resizing():
  _, source = vit_params(1, 8, seed=1, conv_stem=(8,))
  _, init = vit_params(2, 8, seed=2, conv_stem=(8,))
  with pytest.raises(ValueError, match=r'patch size \(1, 1\) vs \(2, 2\).*'
                     'conv_stem stem'):
    checkpoint.load_pretrained(source, init)


# ------------------------------------------------------------------- config
def test_patch_resize_is_a_checked_config_key():
  pretrained.check_config(step_config())  # 'pi', the default, passes.
  with pytest.raises(ConfigError, match="patch_resize 'nearest' not in"):
    pretrained.check_config(step_config(pretrained={'patch_resize': 'nearest'}))


def test_the_flat_key_names_the_grouped_one():
  with pytest.raises(ConfigError, match='config.pretrained_patch_resize is now '
                     'config.pretrained.patch_resize'):
    config_keys.check_flags(['train.py', '--config.pretrained_patch_resize=pi'])


# ------------------------------------------------------------------ trainer
def test_training_starts_from_a_checkpoint_of_another_patch_size(
    tiny_run, tmp_path, caplog):
  """The session's /4 run at 16 px fine-tuned as a /8 model at 32 px, the
  embedding frozen, so the checkpoint holds the PI-resized kernel."""
  workdir = str(tmp_path / 'w')
  config = tiny_config(
      tiny_run.data_dir, pretrained_path=tiny_run.workdir, total_steps=1,
      eval_every=1, checkpoint_every=1, model={'patch_size': (8, 8)},
      input={'image_size': 32}, optim={'frozen': 'embedding/.*'},
      eval={'splits': 'test[:64]'}, schedule={'warmup_steps': 0})
  with caplog.at_level(logging.INFO, logger='absl'):
    trainer.train_and_evaluate(config, workdir)
  source = checkpoint.load_params(tiny_run.workdir)['embedding']['kernel']
  np.testing.assert_array_equal(checkpoint.load_params(workdir)['embedding']['kernel'],
                                resize_patch_kernel(source, (8, 8)))
  line, = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith('Loaded pre-trained params')]
  assert 'resized 1: embedding/kernel (4, 4, 1, 32)->(8, 8, 1, 32)' in line


def test_a_patch_size_that_does_not_divide_the_image_fails_first(tiny_run, tmp_path):
  workdir = tmp_path / 'w'
  config = tiny_config(tiny_run.data_dir, pretrained_path=tiny_run.workdir,
                       model={'patch_size': (8, 8)}, input={'image_size': 20})
  with pytest.raises(ConfigError, match='image size 20 is not divisible by the '
                     'patch size 8x8'):
    trainer.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()  # Checked before the workdir, any compile.
  assert not metrics.read_metrics(str(workdir))
