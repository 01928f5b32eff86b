"""Precision policies compute what they claim: the dtypes of every product's
inputs and accumulator in the lowered program, float32 LayerNorm/softmax/GELU
under mixed_bf16, float32 parameters, and answers close to float32."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import models
from vit_jax.config_checks import ConfigError
from vit_jax.models import precision

IMAGES = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
# `stablehlo.dot_general %a, %b, ... : (tensor<AxBxf32>, tensor<...>) -> tensor<...>`
_TYPED_OP = re.compile(r'stablehlo\.(\w+)\b.*: \((tensor<[^>]*>(?:, tensor<[^>]*>)*)\)'
                       r' -> (tensor<[^>]*>)')
_UNARY_OP = re.compile(r'stablehlo\.(\w+) .*: (tensor<[^>]*>)$')


def _dtype(tensor_type: str) -> str:
  return tensor_type.rsplit('x', 1)[-1].rstrip('>').replace('tensor<', '')


def _ops(text: str, names: tuple[str, ...]) -> list[tuple[str, list[str], str]]:
  """(op, input dtypes, output dtype) of every `names` op in StableHLO text."""
  found = []
  for line in text.splitlines():
    match = _TYPED_OP.search(line)
    if match and match.group(1) in names:
      inputs = [_dtype(t) for t in match.group(2).split(', ')]
      found.append((match.group(1), inputs, _dtype(match.group(3))))
      continue
    match = _UNARY_OP.search(line.strip())
    if match and match.group(1) in names:
      found.append((match.group(1), [], _dtype(match.group(2))))
  return found


def _train_hlo(name: str, policy: str, images=IMAGES, **overrides) -> str:
  """StableHLO of loss + gradient for `name` under `policy`."""
  model = models.create_model(name, 10, precision=policy, **overrides)
  params = jax.eval_shape(model.init, jax.random.key(0), images)['params']

  def loss(p, x):
    logits = model.apply({'params': p}, x, train=True,
                         rngs={'dropout': jax.random.key(1)})
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0])
  return jax.jit(jax.value_and_grad(loss)).lower(params, images).as_text()


@pytest.mark.parametrize('policy, product, accumulator', [
    ('float32', 'f32', 'f32'), ('mixed_bf16', 'bf16', 'f32'),
    ('bfloat16', 'bf16', 'bf16')])
def test_every_product_of_the_train_step_takes_the_policys_dtypes(
    policy, product, accumulator):
  dots = _ops(_train_hlo('ViT-test_4', policy), ('dot_general',))
  # Forward and both backward products of every Dense, the patch embedding,
  # q.k and p.v: a ViT-test (2 blocks) has well over 30.
  assert len(dots) > 30
  for op, inputs, output in dots:
    assert inputs == [product, product], (op, inputs, output)
    assert output == accumulator, (op, inputs, output)


def test_mixed_keeps_layernorm_softmax_gelu_and_the_residual_in_float32():
  text = _train_hlo('ViT-test_4', 'mixed_bf16')
  # LayerNorm's rsqrt, softmax's exp, tanh-GELU's tanh, the residual adds.
  for op in ('rsqrt', 'exponential', 'tanh', 'add'):
    found = _ops(text, (op,))
    assert found, op
    assert {out for _, _, out in found} == {'f32'}, (op, found[:3])
  # bf16 appears only as product inputs: converts into bf16 and the dots.
  bf16_ops = {name for name, _, out in _ops(
      text, ('add', 'multiply', 'subtract', 'divide', 'exponential', 'tanh',
             'rsqrt', 'reduce', 'maximum', 'dot_general', 'convert'))
      if out == 'bf16'}
  assert bf16_ops == {'convert'}


def test_bfloat16_runs_its_activations_in_bf16_but_softmax_in_float32():
  text = _train_hlo('ViT-test_4', 'bfloat16')
  assert 'bf16' in {out for _, _, out in _ops(text, ('tanh',))}
  assert {out for _, _, out in _ops(text, ('exponential',))} == {'f32'}


@pytest.mark.parametrize('name, overrides', [
    ('R-test+ViT-test', {}), ('Mixer-test_4', {}),
    ('ViT-test_4', dict(conv_stem=(8, 16), patch_size=(1, 1)))])
def test_mixed_reaches_convolutions_and_stems(name, overrides):
  images = np.ones((1, 32, 32, 3), np.float32)
  text = _train_hlo(name, 'mixed_bf16', images, **overrides)
  products = _ops(text, ('dot_general', 'convolution'))
  assert products
  for op, inputs, output in products:
    assert inputs == ['bf16', 'bf16'] and output in ('f32', 'bf16'), (op, inputs)
  forward_convs = [p for p in products if p[0] == 'convolution' and p[2] == 'f32']
  if name != 'ViT-test_4':  # Hybrid and Mixer stems are convolutions.
    assert forward_convs


def test_mixed_answers_and_gradients_stay_close_to_float32():
  f32 = models.create_model('ViT-test_4', 10)
  mixed = models.create_model('ViT-test_4', 10, precision='mixed_bf16')
  params = f32.init(jax.random.key(0), IMAGES)['params']
  params = jax.tree.map(  # Away from the zero head, so gradients are not trivial.
      lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  assert jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(mixed.init, jax.random.key(0), IMAGES)['params'])

  def loss(model):
    return jax.jit(jax.value_and_grad(lambda p: jnp.mean(
        model.apply({'params': p}, IMAGES) ** 2)))(params)
  (v32, g32), (v16, g16) = loss(f32), loss(mixed)
  assert {x.dtype for x in jax.tree.leaves(g16)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(v16, v32, rtol=0.03)
  flat32, flat16 = jax.tree.leaves(g32), jax.tree.leaves(g16)
  total = sum(float(jnp.sum(a * a)) for a in flat32)
  error = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(flat32, flat16))
  assert 0 < error < 1e-3 * total  # Close, and bf16 really was used.


def test_mixed_matmul_gradients_are_the_float32_ones_rounded():
  rng = np.random.default_rng(3)
  a = jnp.asarray(rng.normal(size=(2, 3, 5, 8)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(2, 3, 8, 4)), jnp.float32)
  policy = precision.get_policy('mixed_bf16')
  f = lambda m: lambda x, y: jnp.sum(jnp.sin(m(x, y)))
  exact = jax.grad(f(jnp.matmul), argnums=(0, 1))(a, b)
  mixed = jax.grad(f(policy.matmul), argnums=(0, 1))(a, b)
  for want, got in zip(exact, mixed):
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=0.1, rtol=0.05)
  kernel = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
  out = policy.matmul(a, kernel)
  assert out.shape == (2, 3, 5, 6) and out.dtype == jnp.float32


def test_unknown_policy_and_the_old_dtype_key_are_named():
  with pytest.raises(ValueError, match='mixed_bf16'):
    models.create_model('ViT-test_4', 10, precision='fp8')
  with pytest.raises(ValueError, match='model.dtype was replaced by model.precision'):
    models.create_model('ViT-test_4', 10, dtype='bfloat16')
  section = ml_collections.ConfigDict(dict(name='ViT-test_4', dtype='bfloat16'))
  with pytest.raises(ConfigError, match='replaced by model.precision'):
    models.check_config(section, 16)


def test_policies_need_bf16_hardware_only_on_old_gpus():
  for name in precision.POLICIES:
    precision.check_backend(name, 'cpu')  # CPUs compute bf16 products.
  with pytest.raises(ValueError, match='not a policy'):
    precision.check_backend('float16', 'cpu')
