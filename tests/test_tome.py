"""Token merging (ToMe, vit_jax/models/tome.py) on tiny models: the matching,
the sizes, proportional attention, pooling, gradients, and every refusal."""

import json
import os
import re
import types

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import pytest

from vit_jax import flops
from vit_jax import models
from vit_jax import run_setup
from vit_jax.config_checks import ConfigError
from vit_jax.models import tome
from vit_jax.models.attention import MultiHeadDotProductAttention
from vit_jax.models.vit import Encoder1DBlock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)


def _shapes(model, images=IMAGES):
  return jax.eval_shape(lambda: model.init(jax.random.key(1), images))['params']


def _params(model, images=IMAGES):
  """Random params, head included (its zero init would hide every gradient);
  drawn by numpy from the shapes, as an eager init compiles op by op."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(
      rng.normal(0.0, 0.2, s.shape).astype(np.float32)), _shapes(model, images))


def _logits(model, params, images=IMAGES):
  """Jitted: one compile costs less than eager ToMe's many small ones."""
  return jax.jit(lambda p, x: model.apply({'params': p}, x))(params, images)


def _with_blocks(model, params, images=IMAGES, shapes_only=False):
  """(output, each encoder block's output in order: (x, size) with ToMe)."""
  apply = lambda p, x: model.apply(
      {'params': p}, x, mutable=['intermediates'], capture_intermediates=(
          lambda m, _: isinstance(m, Encoder1DBlock)))
  out, state = (jax.eval_shape(apply, params, images) if shapes_only
                else jax.jit(apply)(params, images))
  blocks = state['intermediates']['Transformer']
  return out, [blocks[f'encoderblock_{i}']['__call__'][0]
               for i in range(len(blocks))]


def test_r0_is_the_plain_model():
  plain = models.create_model('ViT-test_4', 10)
  off = models.create_model('ViT-test_4', 10, tome_r=0)
  on = models.create_model('ViT-test_4', 10, tome_r=2)
  params = _params(plain)
  for model in (off, on):  # Released checkpoints load as they are.
    assert _shapes(model) == _shapes(plain)
  np.testing.assert_array_equal(_logits(plain, params), _logits(off, params))
  jaxpr = lambda m: jax.make_jaxpr(lambda p: m.apply({'params': p}, IMAGES))(
      params)
  assert str(jaxpr(off)) == str(jaxpr(plain))
  # None of ToMe's operations (matching, scatter, log sizes) is in the r=0
  # program; all of them are in the r=2 one.
  for op in ('sort', 'scatter-add', 'log', 'argmax'):
    has = lambda m, op=op: re.search(rf'\b{op}\[?\b', str(jaxpr(m)))
    assert not has(off) and has(on), op


def test_sizes_sum_to_the_tokens_and_cls_stays_first():
  # 17 tokens (16 patches + cls), r=4 over 4 blocks: 4, 4, 4, then the
  # clamp (13 - 8 - 1) // 2 = 2 -> 13, 9, 5, 3 tokens.
  model = models.create_model('ViT-test_4', 10, num_layers=4, tome_r=4)
  assert tome.merge_schedule(4, 17, 1, 4) == [4, 4, 4, 2]
  _, outputs = _with_blocks(model, _params(model))
  assert [x.shape[1] for x, _ in outputs] == [13, 9, 5, 3]
  for x, size in outputs:
    assert size.shape == x.shape[:2] + (1,)
    np.testing.assert_allclose(size.sum((1, 2)), 17.0)
    np.testing.assert_array_equal(size[:, 0, 0], 1.0)  # cls: never merged.


def test_matching_merges_the_most_similar_pair_by_size():
  # 5 tokens, cls first: A = {0, 2, 4}, B = {1, 3}. Token 2's key points
  # along token 3's (cosine 1), token 4's is 60 degrees from token 1's, and
  # the cls key equals token 1's but is protected: r=1 merges 2 into 3.
  c, s = 0.5, np.sqrt(0.75)
  keys = jnp.asarray([[[1, 0], [1, 0], [0, 2], [0, 1], [c, s]]], jnp.float32)
  x = jnp.arange(15, dtype=jnp.float32).reshape(1, 5, 3)
  size = jnp.asarray([[[1], [1], [1], [2], [1]]], jnp.float32)
  merged, new_size = tome.merge_tokens(x, size, keys, 1, num_prefix=1)
  # [cls, unmerged A (4), B (1, 3 with 2 merged in)], size-weighted.
  want = jnp.stack([x[0, 0], x[0, 4], x[0, 1], (x[0, 2] + 2 * x[0, 3]) / 3])
  np.testing.assert_allclose(merged[0], want, rtol=1e-6)
  np.testing.assert_array_equal(new_size[0, :, 0], [1, 1, 1, 3])
  # Without protection the cls token, an exact match of token 1, goes too.
  _, new_size = tome.merge_tokens(x, size, keys.at[0, 2].set([0.3, 1]), 1,
                                  num_prefix=0)
  np.testing.assert_array_equal(new_size[0, :, 0], [1, 1, 2, 2])


@pytest.mark.parametrize('impl', ['xla', 'fused'])
def test_proportional_attention_counts_a_size_as_copies(impl):
  attention = MultiHeadDotProductAttention(num_heads=2, impl=impl)
  a, b, q = jax.random.normal(jax.random.key(3), (3, 1, 1, 8))
  params = attention.init(jax.random.key(4), q, q, deterministic=True)
  merged = attention.apply(params, q, jnp.concatenate([a, b], 1),
                           deterministic=True, bias=tome.size_bias(
                               jnp.asarray([[[1.0], [2.0]]])))
  copies = attention.apply(params, q, jnp.concatenate([a, b, b], 1),
                           deterministic=True)
  np.testing.assert_allclose(merged, copies, rtol=1e-5, atol=1e-6)


def test_the_fused_kernel_merges_as_the_explicit_path():
  xla = models.create_model('ViT-test_4', 10, tome_r=4, classifier='map')
  params = _params(xla)
  np.testing.assert_allclose(
      _logits(xla.clone(attention_impl='fused'), params), _logits(xla, params),
      rtol=1e-5, atol=1e-5)


def test_gap_pools_by_size():
  x = jax.random.normal(jax.random.key(5), (1, 2, 4))
  np.testing.assert_allclose(
      tome.weighted_mean(x, jnp.asarray([[[1.0], [2.0]]])),
      jnp.mean(x[:, jnp.asarray([0, 1, 1])], 1), rtol=1e-6)
  model = models.create_model('ViT-test_4', None, tome_r=4, classifier='gap')
  params = _params(model)
  features, blocks = _with_blocks(model, params)
  # The pooled output is encoder_norm of the last block's tokens, weighted.
  x, size = blocks[-1]
  norm = nn.LayerNorm(epsilon=1e-6).apply(
      {'params': params['Transformer']['encoder_norm']}, x)
  np.testing.assert_allclose(features, tome.weighted_mean(norm, size), rtol=1e-5)
  assert not np.allclose(features, norm.mean(1), rtol=1e-3)


def test_gradients_flow_in_training():
  # Stochastic depth (per-example masks on merged tokens) and remat (sizes
  # as a traced block argument) too.
  model = models.create_model('ViT-test_4', 10, tome_r=4, stochastic_depth=0.2,
                              remat_policy='full')
  params = _params(model)

  def loss(p):
    logits = model.apply({'params': p}, IMAGES, train=True,
                         rngs={'dropout': jax.random.key(6)})
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), path


@pytest.mark.parametrize('name,overrides', [
    ('R-test+ViT-test', {}),
    ('ViT-test_4', dict(conv_stem=(8, 16), patch_size=(1, 1)))])
def test_hybrid_and_conv_stem_models_merge(name, overrides):
  config = models.get_model_config(name)
  config.update(overrides)
  plain = models.create_model(config, 10)
  _, blocks = _with_blocks(plain, _shapes(plain), shapes_only=True)
  tokens = blocks[0].shape[1]  # The stem's grid, plus cls.
  r = (tokens - 1) // 2  # The most that check_image_size allows at 16 px.
  config.tome_r = r
  models.check_image_size(config, 16)
  model = models.create_model(config, 10)
  logits, blocks = _with_blocks(model, _params(model))
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
  assert blocks[0][0].shape[1] == tokens - r
  config.tome_r = r + 1
  with pytest.raises(ValueError, match=f'tome_r={r + 1} removes more tokens '
                     'than block 0 has'):
    models.check_image_size(config, 16)


@pytest.mark.parametrize('name,overrides,message', [
    ('GFNet-test', {}, "needs attention blocks: token_mixer 'global_filter'"),
    ('AFNO-test_4', {}, "needs attention blocks: token_mixer 'afno'"),
    ('Mixer-test_4', {}, 'an MLP-Mixer cannot merge tokens'),
    ('ViT-test_4', dict(scan_layers=True), 'cannot run with scan_layers=True'),
    ('ViT-test_4', dict(attention_impl='favor'), "attention_impl='favor'"),
    ('ViT-test_4', dict(classifier='unpooled'), "classifier 'unpooled'"),
    ('ViT-test_4', dict(classifier='token_unpooled'), "'token_unpooled'"),
    ('ViT-test_4', dict(tome_r=-1), 'tome_r must be an integer >= 0'),
])
def test_models_that_cannot_merge_are_refused(name, overrides, message):
  overrides = dict(dict(tome_r=2), **overrides)
  with pytest.raises(ValueError, match=message):
    models.create_model(name, 10, **overrides)
  section = models.model_section('ViT-test_4') if name == 'Mixer-test_4' else (
      models.model_section(name))
  section.update(name=name, **overrides)  # A ViT section renamed to a Mixer.
  with pytest.raises(ConfigError, match=message):
    models.check_config(section, 16)


@pytest.mark.parametrize('r', [2.5, True, '2'])
def test_a_non_integer_r_is_refused(r):
  # The registry's field is an int: ml_collections refuses 2.5 and '2' itself.
  with pytest.raises((TypeError, ValueError), match='tome_r'):
    models.create_model('ViT-test_4', 10, tome_r=r)
  with pytest.raises(ValueError, match='tome_r must be an integer >= 0'):
    tome.check_tome(models.create_model('ViT-test_4', 10).clone(tome_r=r))


def test_r_too_large_for_the_image_is_refused_before_tracing():
  section = models.model_section('ViT-test_4', tome_r=8)
  models.check_config(section, 16)  # 17 tokens: 8 of A's 9 (cls stays).
  with pytest.raises(ConfigError, match='tome_r=9 removes more tokens than '
                     r'block 0 has to merge: it has 17 tokens \(1 prefix\)'):
    models.check_config(models.model_section('ViT-test_4', tome_r=9), 16)
  gap = models.model_section('ViT-test_4', tome_r=9, classifier='gap')
  with pytest.raises(ConfigError, match='at most 8 per block'):
    models.check_config(gap, 16)
  models.check_config(gap, 20)  # 25 tokens.


def _train_py_config(*args):
  argv = ['train.py', f'--config={ROOT}/configs/quickstart.py', *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values,
                                   lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_the_training_config_takes_tome_r():
  config = _train_py_config('--config.model.tome_r=4')
  assert config.model.tome_r == 4
  run_setup.check_config(config)
  assert models.create_model(config.model, 10).tome_r == 4
  with pytest.raises(ConfigError, match='config.model.*tome_r=20 removes more'):
    run_setup.check_config(_train_py_config('--config.model.tome_r=20'))


def test_forward_flops_follow_the_merged_tokens():
  plain = models.create_model('ViT-test_4-gap', 10, num_layers=4)
  merged = plain.clone(tome_r=3)
  shape = (16, 16, 3)
  analytic = {m.tome_r: flops.model_forward_flops(m, shape) for m in (plain, merged)}
  # 16 tokens, 3 merged after each block's attention: attention at 16, 13,
  # 10, 7 tokens, the MLP at 13, 10, 7, 4, plus each block's A x B product.
  mlp = 2 * 2 * 32 * 64  # Per token: hidden 32 -> 64 -> 32.
  matching = sum(tome.matching_flops(n, 3, 16) for n in (16, 13, 10, 7))
  assert matching == 2 * 16 * (8 * 8 + 7 * 6 + 5 * 5 + 4 * 3)
  attention = sum(flops.block_flops(plain, (4, 4), n) - n * mlp
                  for n in (16, 13, 10, 7))
  assert analytic[3] - analytic[0] == pytest.approx(
      attention + mlp * (13 + 10 + 7 + 4) + matching
      - 4 * flops.block_flops(plain, (4, 4)))
  images = jnp.zeros((1,) + shape)
  xla = {m.tome_r: flops.step_flops(jax.jit(m.apply).lower(
      {'params': _shapes(m, images)}, images)) for m in (plain, merged)}
  # XLA's count of what runs falls as much (0.640 vs 0.637 analytic).
  assert xla[3] / xla[0] == pytest.approx(analytic[3] / analytic[0], rel=0.03)


def test_attention_maps_refuse_a_merging_model():
  from vit_jax.tools import attention_map  # pylint: disable=g-import-not-at-top
  model = models.create_model('ViT-test_4', 10, tome_r=2)
  with pytest.raises(ValueError, match='merges tokens.*not the patch grid'):
    attention_map.collect_attention(types.SimpleNamespace(model=model), None)


_BENCH = ['benchmark', '--model=ViT-test_4', '--image_size=16', '--channels=1',
          '--num_classes=10', '--batch=8', '--steps=1', '--repeats=2',
          '--warmup=1', '--mode=infer']


def test_the_benchmark_times_merged_models_interleaved(tmp_path):
  from vit_jax.tools import benchmark, cli  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'tome.json'
  assert cli.run(benchmark.define_flags, benchmark.main,
                 [*_BENCH, '--tome_r=0,4', f'--json={out}']) == 0
  result = json.loads(out.read_text())
  merged = result['tome_r=4']
  assert result['tome_r'] == 0 and len(merged['img_per_sec_runs']) == 2
  assert merged['speedup'] > 0 and merged['img_per_sec'] > 0
  assert merged['flops_per_step'] < 0.8 * result['flops_per_step']


@pytest.mark.parametrize('args,message', [
    (['--tome_r=9'], 'tome_r=9 removes more tokens than block 0 has'),
    (['--tome_r=0,x'], '--tome_r must be distinct integers >= 0'),
    (['--tome_r=-1'], '--tome_r must be distinct integers >= 0'),
    (['--tome_r=2', '--model=Mixer-test_4'], 'Mixer-test_4 has no attention'),
    (['--tome_r=2', '--compare=timm'], 'timm has no token merging'),
])
def test_the_benchmark_refuses_what_cannot_merge(args, message, capsys):
  from vit_jax.tools import benchmark, cli  # pylint: disable=g-import-not-at-top
  assert cli.run(benchmark.define_flags, benchmark.main, [*_BENCH, *args]) == 1
  assert message in capsys.readouterr().err
