"""Model family: sizes, parameter layout, numerics against an independent oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models

# Exact parameter counts at 224 px / 1000 classes (16/32 px for the test models),
# computed once with this code and pinned. Cross-checked against published sizes:
# ViT-B/16 86.6M, ViT-L/16 304.3M, ViT-H/14 632.0M, Mixer-B/16 59.9M (timm agrees).
EXPECTED_PARAMS = {
    'Mixer-B_16': 59_880_472, 'Mixer-B_32': 60_293_428,
    'Mixer-L_16': 208_196_168, 'Mixer-L_32': 206_939_264,
    'Mixer-test_4': 47_528,
    'R-test+ViT-test': 145_032,
    'R26+ViT-B_32': 101_383_976, 'R26+ViT-S_32': 36_431_912,
    'R50+ViT-B_16': 98_659_112, 'R50+ViT-L_32': 328_994_856,
    'ViT-B_16': 86_567_656, 'ViT-B_16-gap': 86_566_120,
    'ViT-B_32': 88_224_232, 'ViT-B_32-gap': 88_222_696,
    'ViT-B_8': 86_576_872, 'ViT-B_8-gap': 86_575_336,
    'ViT-H_14': 632_045_800, 'ViT-H_14-gap': 632_043_240,
    'ViT-L_16': 304_326_632, 'ViT-L_16-gap': 304_324_584,
    'ViT-L_32': 306_535_400, 'ViT-L_32-gap': 306_533_352,
    'ViT-S_16': 22_050_664, 'ViT-S_16-gap': 22_049_896,
    'ViT-S_32': 22_878_952, 'ViT-S_32-gap': 22_878_184,
    'ViT-Ti_16': 5_717_416, 'ViT-Ti_16-gap': 5_717_032,
    'ViT-test_4': 53_832, 'ViT-test_4-gap': 53_768,
    # Equal to the official GFNet code's count (raoyongming/GFNet gfnet.py:
    # patch conv, pos_embed, per block 2 LayerNorms, complex_weight
    # [14, 8, dim, 2] and the 4x MLP, final norm, head), worked out by hand.
    'GFNet-Ti': 7_511_784, 'GFNet-XS': 15_985_768, 'GFNet-S': 24_869_608,
    'GFNet-B': 43_120_616, 'GFNet-test': 58_760,
    # ViT-X_16-gap with each block's 4 attention projections replaced by AFNO's
    # w1, b1, w2, b2 (8 blocks): B/16 86_566_120 - 12 * (2_362_368 - 297_984).
    'AFNO-Ti_16': 4_168_744, 'AFNO-S_16': 15_856_744, 'AFNO-B_16': 61_793_512,
    'AFNO-test_4': 46_600,
}


def _param_shapes(name, size=224, num_classes=1000, **overrides):
  model = models.create_model(name, num_classes, **overrides)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return variables['params']


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('name', models.list_models())
def test_parameter_count_is_pinned(name):
  size = 32 if 'test' in name else 224
  assert _count(_param_shapes(name, size)) == EXPECTED_PARAMS[name]


def test_every_registered_model_is_pinned():
  assert sorted(EXPECTED_PARAMS) == models.list_models()


def test_paper_table1_sizes():
  # ViT paper, Table 1: Base 86M, Large 307M, Huge 632M, truncated to whole millions
  # (B/16 has 86.57M, H/14 632.05M). No rounding of ViT-L/16's 304.3M (or L/32's
  # 306.5M) gives 307M; timm reports the same 304.3M, so we hold Large to 1%.
  assert EXPECTED_PARAMS['ViT-B_16'] // 10**6 == 86
  assert EXPECTED_PARAMS['ViT-H_14'] // 10**6 == 632
  assert abs(EXPECTED_PARAMS['ViT-L_16'] / 307e6 - 1) < 0.01


def test_gfnet_paper_sizes():
  # GFNet paper / official README: 7M, 16M, 25M, 43M. Ti's 7.51M is truncated
  # there, XS's 15.99M rounded, so each must lie within 0.6M of its figure.
  for name, millions in (('GFNet-Ti', 7), ('GFNet-XS', 16), ('GFNet-S', 25),
                         ('GFNet-B', 43)):
    assert abs(EXPECTED_PARAMS[name] / 1e6 - millions) < 0.6, name


def test_vit_b16_paths_and_shapes_are_the_released_layout():
  flat = {'/'.join(k.key for k in path): tuple(v.shape) for path, v in
          jax.tree_util.tree_leaves_with_path(_param_shapes('ViT-B_16'))}
  expected = {
      'embedding/kernel': (16, 16, 3, 768), 'embedding/bias': (768,),
      'cls': (1, 1, 768),
      'Transformer/posembed_input/pos_embedding': (1, 197, 768),
      'Transformer/encoder_norm/scale': (768,),
      'Transformer/encoder_norm/bias': (768,),
      'head/kernel': (768, 1000), 'head/bias': (1000,),
  }
  for i in range(12):
    b = f'Transformer/encoderblock_{i}'
    for ln in ('LayerNorm_0', 'LayerNorm_2'):
      expected[f'{b}/{ln}/scale'] = expected[f'{b}/{ln}/bias'] = (768,)
    for qkv in ('query', 'key', 'value'):
      expected[f'{b}/MultiHeadDotProductAttention_1/{qkv}/kernel'] = (768, 12, 64)
      expected[f'{b}/MultiHeadDotProductAttention_1/{qkv}/bias'] = (12, 64)
    expected[f'{b}/MultiHeadDotProductAttention_1/out/kernel'] = (12, 64, 768)
    expected[f'{b}/MultiHeadDotProductAttention_1/out/bias'] = (768,)
    expected[f'{b}/MlpBlock_3/Dense_0/kernel'] = (768, 3072)
    expected[f'{b}/MlpBlock_3/Dense_0/bias'] = (3072,)
    expected[f'{b}/MlpBlock_3/Dense_1/kernel'] = (3072, 768)
    expected[f'{b}/MlpBlock_3/Dense_1/bias'] = (768,)
  assert flat == expected
  assert _param_shapes('ViT-B_16', 384)['Transformer']['posembed_input'][
      'pos_embedding'].shape == (1, 577, 768)


def test_hybrid_stem_params_sit_at_the_top_level():
  params = _param_shapes('R50+ViT-B_16')
  assert params['conv_root']['kernel'].shape == (7, 7, 3, 64)
  assert params['gn_root']['scale'].shape == (64,)
  assert params['block1']['unit1']['conv_proj']['kernel'].shape == (1, 1, 64, 256)
  assert params['block3']['unit9']['gn3']['bias'].shape == (1024,)
  assert params['embedding']['kernel'].shape == (1, 1, 1024, 768)
  # 224 / 16 = 14x14 tokens + cls.
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 197, 768)


# ---------------------------------------------------------------------------
# Independent oracle: a ViT forward pass in plain NumPy, written from the paper's
# equations (float64), not from the Flax code.

def _layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _numpy_vit(params, images, patch, num_heads):
  b, h, w, c = images.shape
  gh, gw = h // patch, w // patch
  patches = images.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, gh * gw, patch * patch * c)
  kernel = params['embedding']['kernel'].reshape(patch * patch * c, -1)
  x = patches @ kernel + params['embedding']['bias']
  cls = np.broadcast_to(params['cls'], (b, 1, x.shape[-1]))
  x = np.concatenate([cls, x], 1)
  t = params['Transformer']
  x = x + t['posembed_input']['pos_embedding']
  i = 0
  while f'encoderblock_{i}' in t:
    blk = t[f'encoderblock_{i}']
    att = blk['MultiHeadDotProductAttention_1']
    y = _layer_norm(x, blk['LayerNorm_0'])
    q, k, v = (np.einsum('btd,dhe->bthe', y, att[n]['kernel']) + att[n]['bias']
               for n in ('query', 'key', 'value'))
    head_dim = q.shape[-1]
    probs = _softmax(np.einsum('bqhe,bkhe->bhqk', q, k) / np.sqrt(head_dim))
    y = np.einsum('bhqk,bkhe->bqhe', probs, v)
    x = x + np.einsum('bqhe,hed->bqd', y, att['out']['kernel']) + att['out']['bias']
    mlp = blk['MlpBlock_3']
    y = _layer_norm(x, blk['LayerNorm_2'])
    y = _gelu_tanh(y @ mlp['Dense_0']['kernel'] + mlp['Dense_0']['bias'])
    x = x + y @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias']
    i += 1
  assert i > 0 and num_heads == q.shape[2]
  x = _layer_norm(x, t['encoder_norm'])[:, 0]
  return x @ params['head']['kernel'] + params['head']['bias']


def _random_params(model, images, seed=0):
  """Initialised params with every leaf replaced by non-trivial random values."""
  params = jax.eval_shape(model.init, jax.random.key(seed), images)['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: (rng.normal(size=p.shape) * 0.3).astype(np.float32), params)


def test_flax_vit_matches_numpy_oracle():
  model = models.create_model('ViT-test_4', 7, num_layers=2)
  images = np.random.default_rng(1).uniform(-1, 1, (3, 16, 12, 3)).astype(np.float32)
  params = _random_params(model, images)
  got = model.apply({'params': params}, images, train=False)
  params64 = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
  want = _numpy_vit(params64, images.astype(np.float64), patch=4, num_heads=2)
  assert got.shape == (3, 7)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_stays_close_to_float32():
  images = np.random.default_rng(2).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
  f32 = models.create_model('ViT-test_4', 10)
  bf16 = models.create_model('ViT-test_4', 10, precision='bfloat16')
  params = _random_params(f32, images)
  out32 = jax.jit(f32.apply)({'params': params}, images)
  out16 = jax.jit(bf16.apply)({'params': params}, images)
  assert out16.dtype == jnp.float32  # Logits come back in float32.
  assert jax.tree.leaves(jax.eval_shape(bf16.init, jax.random.key(0), images)
                         )[0].dtype == jnp.float32
  scale = float(jnp.abs(out32).max())
  assert float(jnp.abs(out32 - out16).max()) < 0.05 * scale
  assert float(jnp.abs(out32 - out16).max()) > 0  # bf16 really was used.


def test_dropout_acts_only_when_training():
  model = models.create_model('ViT-test_4', 10, dropout_rate=0.3,
                              attention_dropout_rate=0.3, stochastic_depth=0.3)
  images = np.random.default_rng(3).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  params = _random_params(model, images)
  apply = jax.jit(lambda train, seed: model.apply(
      {'params': params}, images, train=train,
      rngs={'dropout': jax.random.key(seed)}), static_argnums=0)
  np.testing.assert_array_equal(apply(False, 0), apply(False, 1))
  assert not np.allclose(apply(True, 0), apply(True, 1))
  assert not np.allclose(apply(True, 0), apply(False, 0))


@pytest.mark.parametrize('classifier,shape', [
    ('token', (2, 5)), ('gap', (2, 5)), ('map', (2, 5)),
    ('unpooled', (2, 16, 5)), ('token_unpooled', (2, 17, 5))])
def test_classifiers(classifier, shape):
  model = models.create_model('ViT-test_4', 5, classifier=classifier)
  images = jnp.zeros((2, 16, 16, 3))
  variables = model.init(jax.random.key(0), images)
  assert model.apply(variables, images).shape == shape
  assert ('cls' in variables['params']) == classifier.startswith('token')
  assert ('MAPHead_0' in variables['params']) == (classifier == 'map')


def test_map_head_uses_big_vision_names():
  params = _param_shapes('ViT-test_4', 16, 5, classifier='map')['MAPHead_0']
  assert params['probe'].shape == (1, 1, 32)
  assert set(params) == {'probe', 'MultiHeadDotProductAttention_0', 'LayerNorm_0',
                         'MlpBlock_0'}


def test_features_when_num_classes_is_none_and_pre_logits():
  model = models.create_model('ViT-test_4', None, representation_size=24)
  variables = model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)))
  assert 'head' not in variables['params']
  assert variables['params']['pre_logits']['kernel'].shape == (32, 24)
  assert model.apply(variables, jnp.zeros((2, 16, 16, 3))).shape == (2, 24)


def test_initialisation_follows_the_reference():
  params = models.create_model('ViT-test_4', 10).init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  assert not np.any(params['cls']) and not np.any(params['head']['kernel'])
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  assert 0.01 < float(np.std(posemb)) < 0.03
  mlp_bias = params['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['bias']
  assert 0 < float(np.abs(mlp_bias).max()) < 1e-4


@pytest.mark.parametrize('patch, size, channels',
                         [((4, 4), 16, 3), ((7, 7), 28, 1), ((8, 4), 16, 3)])
def test_patch_embedding_is_the_strided_conv(patch, size, channels):
  """Same parameters (names, shapes, init) and outputs as the released conv."""
  import flax.linen as nn
  from vit_jax.models.vit import PatchEmbedding
  images = jax.random.normal(jax.random.key(1), (2, size, size, channels))
  conv = nn.Conv(24, patch, strides=patch, padding='VALID')
  ours = PatchEmbedding(24, patch)
  conv_params = conv.init(jax.random.key(0), images)
  our_params = ours.init(jax.random.key(0), images)
  assert jax.tree.map(np.shape, conv_params) == jax.tree.map(np.shape, our_params)
  for a, b in zip(jax.tree.leaves(conv_params), jax.tree.leaves(our_params)):
    np.testing.assert_array_equal(a, b)
  # Random (non-zero) bias so the test sees it added.
  params = jax.tree.map(
      lambda p: jax.random.normal(jax.random.key(2), p.shape), conv_params)
  np.testing.assert_allclose(ours.apply(params, images),
                             conv.apply(params, images), rtol=1e-5, atol=1e-5)


def test_sincos2d_posemb_has_no_parameters_and_known_values():
  params = _param_shapes('ViT-test_4', 16, 10, posemb='sincos2d', classifier='gap')
  assert 'posembed_input' not in params['Transformer']
  pe = models.posemb_sincos_2d(2, 3, 8)
  assert pe.shape == (1, 6, 8)
  # Token (row 1, col 2): quarters are sin(col w), cos(col w), sin(row w), cos(row w)
  # with w = 1/10000**(k/1), k in {0, 1}.
  w = np.array([1.0, 1e-4])
  np.testing.assert_allclose(
      pe[0, 5], np.concatenate([np.sin(2 * w), np.cos(2 * w), np.sin(w), np.cos(w)]),
      rtol=1e-6)


def test_attention_weights_are_sown_and_normalised():
  model = models.create_model('ViT-test_4', 10)
  images = jnp.ones((1, 16, 16, 3))
  variables = model.init(jax.random.key(0), images)
  _, state = model.apply(variables, images, mutable=['intermediates'])
  weights = state['intermediates']['Transformer']['encoderblock_1'][
      'MultiHeadDotProductAttention_1']['attention_weights'][0]
  assert weights.shape == (1, 2, 17, 17)  # [batch, heads, q, k]
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)


def test_fused_attention_matches_explicit():
  images = np.random.default_rng(4).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  explicit = models.create_model('ViT-test_4', 10)
  fused = models.create_model('ViT-test_4', 10, attention_impl='fused')
  params = _random_params(explicit, images)
  np.testing.assert_allclose(fused.apply({'params': params}, images),
                             explicit.apply({'params': params}, images),
                             atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('name,overrides', [
    ('R-test+ViT-test', {}), ('Mixer-test_4', {}), ('ViT-test_4', {}),
    ('ViT-test_4', dict(attention_impl='favor', favor_features=16)),
    ('GFNet-test', {}), ('AFNO-test_4', dict(afno_hard_thresholding_fraction=0.5)),
])
def test_forward_and_backward_are_finite(name, overrides):
  model = models.create_model(name, 10, **overrides)
  images = np.random.default_rng(5).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  # Jitted: one compile, not one per op of an eager forward and backward.
  params = jax.jit(model.init)(jax.random.key(0), images)['params']
  params = jax.tree.map(lambda p: p + 0.01, params)  # Non-zero head: real gradients.
  loss = lambda p: jnp.mean(model.apply({'params': p}, images, train=True,
                                        rngs={'dropout': jax.random.key(1),
                                              'favor': jax.random.key(2)})**2)
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(float(value))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads))) > 0


def test_std_conv_standardises_its_kernel():
  from vit_jax.models.resnet import StdConv
  conv = StdConv(4, (3, 3), use_bias=False)
  x = np.random.default_rng(6).normal(size=(1, 5, 5, 2)).astype(np.float32)
  params = conv.init(jax.random.key(0), x)['params']
  kernel = np.asarray(params['kernel'])
  std = (kernel - kernel.mean((0, 1, 2))) / (kernel.std((0, 1, 2)) + 1e-5)
  want = jax.lax.conv_general_dilated(x, std, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(conv.apply({'params': params}, x), want, atol=1e-5)


def test_bad_names_and_sizes_are_clear_errors():
  with pytest.raises(ValueError, match=r"Unknown model 'ViT-B16'.*ViT-B_16"):
    models.get_model_config('ViT-B16')
  with pytest.raises(ValueError, match='Unknown model override.*hiddensize'):
    models.create_model('ViT-B_16', 10, hiddensize=3)
  with pytest.raises(ValueError, match=r'image size 30 .*patch size 4x4'):
    models.check_image_size('ViT-test_4', 30)
  with pytest.raises(ValueError, match=r'stem stride 16.*multiple of 16'):
    models.check_image_size('R50+ViT-B_16', 200)
  models.check_image_size('R50+ViT-B_16', 224)
  model = models.create_model('ViT-test_4', 10)
  with pytest.raises(ValueError, match=r'not divisible by the patch size \(4, 4\)'):
    model.init(jax.random.key(0), jnp.zeros((1, 18, 16, 3)))
  with pytest.raises(ValueError, match='classifier'):
    models.create_model('ViT-test_4', 10, classifier='cls').init(
        jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
