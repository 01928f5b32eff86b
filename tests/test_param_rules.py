"""Per-parameter rules: frozen params, lr multipliers, layer-wise lr decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from vit_jax import models
from vit_jax import optim
from vit_jax import param_rules


def _config(**optim_keys):
  """Defaults at a constant lr of 0.1, with `optim_keys` set in config.optim."""
  config = common.get_config()
  config.total_steps = 10
  config.schedule.warmup_steps = 0
  config.schedule.name = 'constant'
  config.schedule.base_lr = 0.1
  config.optim.update(optim_keys)
  return config


def _shapes(name='ViT-test_4', **overrides):
  """Parameter shapes of a real registered model (no arrays are computed)."""
  model = models.create_model(name, 10, **overrides)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jnp.zeros((1, 16, 16, 3)))
  return variables['params']


def _ones(name='ViT-test_4', **overrides):
  return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), _shapes(name, **overrides))


def _flat(tree):
  return dict(zip(jax.tree.leaves(param_rules.tree_paths(tree)), jax.tree.leaves(tree)))


def _updates(tx, params, grads, steps=1):
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return updates, params, state


# ------------------------------------------------------------------ mechanism
def test_regex_mask_fullmatch():
  params = {'head': {'kernel': 1, 'bias': 2}, 'prehead': {'kernel': 3}, 'kernel': 4}
  assert param_rules.regex_mask(params, '.*/kernel') == {
      'head': {'kernel': True, 'bias': False}, 'prehead': {'kernel': True},
      'kernel': False}
  # fullmatch: 'head/.*' does not catch 'prehead/kernel'.
  assert param_rules.regex_mask(params, 'head/.*')['prehead'] == {'kernel': False}
  assert param_rules.regex_mask(params, 'kernel')['kernel'] is True
  assert not any(jax.tree_util.tree_leaves(param_rules.regex_mask(params, '')))
  assert param_rules.tree_paths({'a': [{'b': 0}]}) == {'a': [{'b': 'a/0/b'}]}


def test_match_rules_first_match_wins():
  params = {'head': {'kernel': 0, 'bias': 0}, 'embedding': {'kernel': 0}}
  rules = (('head/bias', 'a'), ('head/.*', 'b'), ('.*/kernel', 'c'))
  assert param_rules.match_rules(params, rules, 'default') == {
      'head': {'kernel': 'b', 'bias': 'a'}, 'embedding': {'kernel': 'c'}}
  assert param_rules.match_rules(params, (), 1.0)['head'] == {'kernel': 1.0, 'bias': 1.0}


@pytest.mark.parametrize('overrides,top_names', [
    (dict(), ['Transformer/encoder_norm/scale', 'head/kernel']),
    (dict(classifier='map', representation_size=8),
     ['MAPHead_0/probe', 'MAPHead_0/MlpBlock_0/Dense_1/bias', 'pre_logits/kernel']),
])
def test_layer_ids_of_a_vit(overrides, top_names):
  depths, top = param_rules.layer_ids(_shapes(**overrides))
  depths = _flat(depths)
  assert top == 3  # ViT-test has 2 blocks.
  for name in ('embedding/kernel', 'Transformer/posembed_input/pos_embedding'):
    assert depths[name] == 0, name
  assert depths['Transformer/encoderblock_0/LayerNorm_0/scale'] == 1
  assert depths['Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel'] == 2
  for name in top_names:
    assert depths[name] == 3, name
  if 'classifier' not in overrides:
    assert depths['cls'] == 0


def test_layer_ids_of_a_mixer_and_a_hybrid():
  depths, top = param_rules.layer_ids(_shapes('Mixer-test_4'))
  depths = _flat(depths)
  assert top == 3
  assert depths['stem/kernel'] == 0
  assert depths['MixerBlock_1/token_mixing/Dense_0/kernel'] == 2
  assert depths['pre_head_layer_norm/scale'] == depths['head/kernel'] == 3
  depths, _ = param_rules.layer_ids(_shapes('R-test+ViT-test'))
  assert _flat(depths)['conv_root/kernel'] == 0


# ------------------------------------------------------------------ frozen
@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_frozen_params_do_not_change(name):
  config = _config(frozen='embedding/.*|Transformer/encoderblock_0/.*',
                   weight_decay=0.1, name=name)
  params = _ones()
  tx, _ = optim.make_optimizer(config, 10)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  _, new, state = _updates(tx, params, grads, steps=3)
  old, new = _flat(params), _flat(new)
  for key in old:
    frozen = key.startswith(('embedding/', 'Transformer/encoderblock_0/'))
    assert np.array_equal(new[key], old[key]) == frozen, key
  # Frozen parameters carry no optimizer state (no momentum / Adam moments).
  leaves = jax.tree.leaves(state)
  state_size = sum(x.size for x in leaves if x.ndim > 0)
  trainable = sum(v.size for k, v in old.items()
                  if not k.startswith(('embedding/', 'Transformer/encoderblock_0/')))
  assert state_size == trainable * (1 if name == 'sgd' else 2)


def test_frozen_gradients_do_not_count_in_clipping():
  params = {'a': jnp.ones(4), 'b': jnp.ones(4)}
  grads = {'a': jnp.full(4, 0.1), 'b': jnp.full(4, 1e6)}
  plain = _config(grad_clip_norm=1.0, name='sgd', momentum=0.0)
  frozen = _config(grad_clip_norm=1.0, frozen='b', name='sgd', momentum=0.0)
  want, _, _ = _updates(optim.make_optimizer(plain, 10)[0], {'a': params['a']},
                        {'a': grads['a']})
  got, _, _ = _updates(optim.make_optimizer(frozen, 10)[0], params, grads)
  np.testing.assert_array_equal(got['a'], want['a'])  # Norm 0.2 < 1: unclipped.
  np.testing.assert_array_equal(got['b'], 0.0)


# ------------------------------------------------------------------ multipliers
@pytest.mark.parametrize('name', ['sgd', 'adamw'])
@pytest.mark.parametrize('steps,wd', [(1, 0.01), (3, 0.0)])
def test_lr_multiplier_scales_the_update_exactly(name, steps, wd):
  # With decay, only the first step compares like for like: later steps decay
  # parameters that the multipliers have already moved apart.
  params = _ones()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  base = _config(weight_decay=wd, name=name)
  ruled = _config(weight_decay=wd, lr_mults=(('head/.*', 10.0), ('.*/bias', 0.25)),
                  name=name)
  want, _, _ = _updates(optim.make_optimizer(base, 10)[0], params, grads, steps)
  got, _, _ = _updates(optim.make_optimizer(ruled, 10)[0], params,
                       grads, steps)
  want, got = _flat(want), _flat(got)
  for key in want:
    factor = 10.0 if key.startswith('head/') else 0.25 if key.endswith('/bias') else 1.0
    np.testing.assert_array_equal(got[key], want[key] * factor, err_msg=key)


def test_layer_decay_multipliers_per_block():
  params = _shapes()
  mults = _flat(param_rules.lr_multipliers(params, layer_decay=0.5))
  assert mults['head/kernel'] == mults['Transformer/encoder_norm/bias'] == 1.0
  assert mults['Transformer/encoderblock_1/LayerNorm_2/scale'] == 0.5
  assert mults['Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel'] == 0.25
  assert mults['embedding/kernel'] == mults['cls'] == 0.125
  assert mults['Transformer/posembed_input/pos_embedding'] == 0.125
  # lr_mults and layer decay multiply.
  both = _flat(param_rules.lr_multipliers(params, (('cls', 4.0),), layer_decay=0.5))
  assert both['cls'] == 0.5 and both['embedding/kernel'] == 0.125


def test_layer_decay_in_the_optimizer():
  params = _ones()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  sgd = dict(name='sgd', momentum=0.0)
  want, _, _ = _updates(optim.make_optimizer(_config(**sgd), 10)[0], params, grads)
  got, _, _ = _updates(optim.make_optimizer(_config(layer_decay=0.5, **sgd), 10)[0],
                       params, grads)
  mults = _flat(param_rules.lr_multipliers(params, layer_decay=0.5))
  for key, value in _flat(got).items():
    np.testing.assert_array_equal(value, _flat(want)[key] * mults[key], err_msg=key)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize('overrides,message', [
    (dict(frozen='embedding/('), r"config.optim.frozen 'embedding/\(' is not a regex"),
    (dict(lr_mults=(('head/[', 2.0),)), r'config.optim.lr_mults\[0\] .* is not a regex'),
    (dict(lr_mults=(('head/.*',),)), r'lr_mults\[0\] must be a \(regex, multiplier'),
    (dict(lr_mults=(('head/.*', -1.0),)), r'lr_mults\[0\] must be'),
    (dict(layer_decay=0.0), r'layer_decay must be in \(0, 1\]'),
    (dict(layer_decay=1.5), r'layer_decay must be in \(0, 1\]'),
])
def test_malformed_rules_are_errors_without_params(overrides, message):
  with pytest.raises(ValueError, match=message):
    optim.check_config(_config(**overrides))


@pytest.mark.parametrize('overrides,message', [
    (dict(frozen='embeding/.*'), r"config.optim.frozen 'embeding/\.\*' matches no parameter"),
    (dict(frozen='.*'), 'matches every parameter: nothing would train'),
    (dict(lr_mults=(('head/.*', 2.0), ('haed/.*', 2.0))),
     r"config.optim.lr_mults\[1\] 'haed/\.\*' applies to no parameter: it matches no"),
    (dict(lr_mults=(('.*', 2.0), ('head/.*', 2.0))),
     r'lr_mults\[1\] .* every parameter it matches is taken by an earlier rule'),
])
def test_rules_that_select_nothing_are_named(overrides, message):
  with pytest.raises(ValueError, match=message):
    param_rules.check_rules_select(_config(**overrides), _shapes())


def test_layer_decay_needs_numbered_blocks():
  with pytest.raises(ValueError, match='layer_decay needs numbered blocks'):
    param_rules.check_rules_select(_config(layer_decay=0.9),
                                   {'dense': {'kernel': jnp.ones(2)}})


def test_describe_lists_frozen_and_factors():
  line = param_rules.describe_param_rules(
      _config(frozen='embedding/.*', lr_mults=(('head/.*', 10.0),)), _shapes())
  assert line.startswith('Parameter rules: frozen: embedding/* (2); lr x1: ')
  assert line.endswith('lr x10: head/* (2)')
