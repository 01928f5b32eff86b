"""Sharding rules: FSDP and 2-D (data x model) meshes train like replicated params.

Runs on the 8 simulated CPU devices of conftest.py with the tiny ViT-test_4
(hidden 32, 2 heads, mlp_dim 64).
"""

import functools
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.serialization import replica_slices
import pytest
from jax.sharding import PartitionSpec as P

from vit_jax import checkpoint
from vit_jax import config_checks
from vit_jax import metrics
from vit_jax import models
from vit_jax import optim
from vit_jax import parallel
from vit_jax import run_setup
from vit_jax import sharding
from vit_jax import steps
from vit_jax import trainer
from vit_jax.checkpoint import orbax_state

from tiny import step_config
from tiny import tiny_config

IMAGE_SHAPE = (16, 16, 3)
FSDP_ALL = (('.*', 'fsdp'),)


_config = step_config


def _init(mesh, rules, fsdp_min_size=0, name='ViT-test_4'):
  """(model, tx, state initialised directly sharded, its shardings)."""
  model = models.create_model(name, 10)
  tx, _ = optim.make_optimizer(_config(), total_steps=10)
  init = functools.partial(steps.create_train_state, model, tx, IMAGE_SHAPE, 0)
  shardings = sharding.state_shardings(jax.eval_shape(init), mesh, rules,
                                       fsdp_min_size)
  return model, tx, jax.jit(init, out_shardings=shardings)(), shardings


def _train(mesh, rules, num_steps=2, name='ViT-test_4'):
  """`num_steps` adamw steps on random batches of 16; returns the final state."""
  model, tx, state, shardings = _init(mesh, rules, name=name)
  step = jax.jit(steps.make_train_step(model, tx, num_classes=10),
                 in_shardings=(shardings, parallel.batch_sharding(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)),
                 donate_argnums=0)
  rng = np.random.default_rng(0)
  for _ in range(num_steps):
    batch = {'image': rng.uniform(-1, 1, (16,) + IMAGE_SHAPE).astype(np.float32),
             'label': rng.integers(0, 10, 16).astype(np.int32)}
    state, _ = step(state, parallel.to_global_batch(batch, mesh))
  assert int(state.step) == num_steps
  return state


def _numpy(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_close(a, b, atol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def _device_bytes(tree):
  """Bytes of `tree` held by one device (its shard of every leaf)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def _total_bytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def replicated_run():
  return _numpy(_train(parallel.make_mesh(), 'replicate').params)


@pytest.mark.parametrize('model_size,rules', [(1, FSDP_ALL), (2, 'fsdp+model')])
def test_sharded_training_equals_replicated(replicated_run, model_size, rules):
  mesh = parallel.make_mesh(model=model_size)
  state = _train(mesh, rules)
  assert dict(mesh.shape) == {'data': 8 // model_size, 'model': model_size}
  query = state.params['Transformer']['encoderblock_0'][
      'MultiHeadDotProductAttention_1']['query']['kernel']
  assert not query.sharding.is_fully_replicated  # Really sharded.
  _assert_trees_close(_numpy(state.params), replicated_run)


@pytest.mark.parametrize('name,leaf,shape,spec', [
    # complex_weight [4, 3, hidden 32, 2]: channels over model, FSDP on the
    # largest other axis that data divides (the grid rows).
    ('GFNet-test', 'GlobalFilter_1/complex_weight', (4, 3, 32, 2),
     P('data', None, 'model', None)),
    # AFNO's w1 [2, blocks 8, 4, 4]: blocks over model, FSDP on a block-size axis.
    ('AFNO-test_4', 'AFNO2D_1/w1', (2, 8, 4, 4), P(None, 'model', 'data', None)),
    ('AFNO-test_4', 'AFNO2D_1/b2', (2, 8, 4), P(None, 'model', 'data'))])
def test_fourier_mixers_shard_their_channel_axes(name, leaf, shape, spec):
  # Specs only: that an annotated program computes what the replicated one
  # does is XLA's guarantee, and the ViT tests above check the plumbing.
  mesh = parallel.make_mesh(model=2)  # 4 x 2.
  model = models.create_model(name, 10)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1,) + IMAGE_SHAPE))['params']
  specs = sharding.param_specs(shapes, sharding.parse_rules('fsdp+model'), mesh, 0)
  assert specs[f'Transformer/encoderblock_0/{leaf}'] == (shape, spec)


def test_per_device_bytes_shrink_by_the_mesh_factor():
  mesh = parallel.make_mesh(model=2)  # 4 x 2.
  _, _, state, _ = _init(mesh, 'fsdp+model')
  block = state.params['Transformer']['encoderblock_0']
  attention, mlp = block['MultiHeadDotProductAttention_1'], block['MlpBlock_3']
  # [hidden 32, heads 2, head_dim 16]: heads over model, hidden over data.
  assert attention['query']['kernel'].sharding.shard_shape((32, 2, 16)) == (8, 1, 16)
  assert attention['out']['kernel'].addressable_shards[0].data.shape == (1, 16, 8)
  assert mlp['Dense_0']['kernel'].addressable_shards[0].data.shape == (8, 32)
  assert mlp['Dense_1']['kernel'].addressable_shards[0].data.shape == (32, 8)
  assert mlp['Dense_0']['bias'].addressable_shards[0].data.shape == (32,)
  assert state.params['head']['bias'].sharding.is_fully_replicated  # 10 % 4 != 0.
  for leaf in jax.tree.leaves(state.params):
    shard = leaf.addressable_shards[0].data
    factor = math.prod(dict(mesh.shape)[a] for a in leaf.sharding.spec if a)
    assert shard.size * factor == leaf.size
  # Adam's moments follow their params; its step count stays replicated.
  adam = state.opt_state[1]  # chain(clip, scale_by_adam, ...)
  for moment in (adam.mu, adam.nu):
    for m, p in zip(jax.tree.leaves(moment), jax.tree.leaves(state.params)):
      assert m.sharding == p.sharding
  assert adam.count.sharding.is_fully_replicated
  # Everything but the 10 head biases, the scalars and the rng is split 4- or 8-way.
  per_device, total = _device_bytes(state), _total_bytes(state)
  assert total / 8 < per_device < total / 3.5


def test_fsdp_min_size_keeps_small_arrays_replicated():
  mesh = parallel.make_mesh()
  _, _, state, _ = _init(mesh, 'fsdp', fsdp_min_size=2048)
  dense_0 = state.params['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']
  assert dense_0['kernel'].addressable_shards[0].data.shape == (32, 8)  # 2048 elements.
  assert dense_0['bias'].sharding.is_fully_replicated  # 64 elements.


def test_stacked_params_split_the_same_axes_from_the_end():
  spec = functools.partial(sharding.param_spec, data_size=4, model_size=2,
                           fsdp_min_size=0)
  name = 'Transformer/encoderblock/MultiHeadDotProductAttention_1/{}/kernel'
  both = frozenset({'fsdp', 'model'})
  assert spec(name.format('key'), (12, 32, 2, 16), both) == P(None, 'data', 'model', None)
  assert spec(name.format('out'), (12, 2, 16, 32), both) == P(None, 'model', None, 'data')
  assert spec('Transformer/encoderblock/MlpBlock_3/Dense_1/kernel', (12, 64, 32),
              frozenset({'model'})) == P(None, 'model', None)


def _abstract_params(**model_overrides):
  model = models.create_model('ViT-test_4', 10, **model_overrides)
  return jax.eval_shape(model.init, jax.random.key(0),
                        np.zeros((1,) + IMAGE_SHAPE, np.float32))['params']


@pytest.mark.parametrize('overrides,model_size,message', [
    (dict(sharding={'rules': 'zero3'}), 1, "'zero3' is not a preset"),
    (dict(sharding={'rules': (('.*', 'fsdp+tp'),)}), 1,
     "strategy 'fsdp\\+tp' is unknown"),
    (dict(sharding={'rules': (('.*', 'replicate+fsdp'),)}), 1, 'is unknown'),
    (dict(sharding={'rules': (('.*/kernal', 'fsdp'),)}), 1,
     'applies to no parameter: it matches no'),
    (dict(sharding={'rules': (('.*', 'fsdp'), ('head/.*', 'model'))}), 1,
     'taken by an earlier rule'),
    (dict(sharding={'rules': (('head/.*', 'model'),)}), 1, 'selects no attention'),
    (dict(sharding={'rules': 'model'}), 4,
     'config.mesh.model=4 does not divide num_heads=2'),
])
def test_bad_rules_are_refused(overrides, model_size, message):
  with pytest.raises(ValueError, match=message):
    sharding.check_rules_select(_config(**overrides), _abstract_params(),
                                parallel.make_mesh(model=model_size))


def test_model_axis_must_divide_mlp_dim():
  params = _abstract_params(num_heads=4, mlp_dim=34)
  sharding.check_rules_select(_config(sharding={'rules': 'model'}), params,
                              parallel.make_mesh(model=2))
  with pytest.raises(ValueError, match='model=4 does not divide mlp_dim=34 of '
                     'Transformer/encoderblock_0/MlpBlock_3/Dense_0/bias'):
    sharding.check_rules_select(_config(sharding={'rules': 'model'}), params,
                                parallel.make_mesh(model=4))


@pytest.mark.parametrize('overrides,message', [
    (dict(train={'parallelism': 'shard_map'}, sharding={'rules': 'fsdp'}),
     "parallelism='shard_map'"),
    (dict(train={'parallelism': 'shard_map'}, mesh=dict(model=2)),
     "parallelism='shard_map'"),
    (dict(mesh=dict(model=0)), 'config.mesh.model must be a positive integer'),
    (dict(sharding={'fsdp_min_size': -1}), 'config.sharding.fsdp_min_size'),
])
def test_config_errors_before_compiling(overrides, message):
  config = _config(total_steps=10)
  config.update(overrides)
  with pytest.raises(config_checks.ConfigError, match=message):
    run_setup.check_config(config)


def test_mesh_must_use_every_device():
  with pytest.raises(ValueError, match='data=2 x model=2 is not the 8 devices'):
    parallel.make_mesh(data=2, model=2)
  with pytest.raises(ValueError, match='model=3 does not divide the 8 devices'):
    parallel.make_mesh(model=3)


def test_checkpoint_restores_into_other_shardings_and_device_counts(tmp_path):
  _, _, saved, _ = _init(parallel.make_mesh(), FSDP_ALL)  # 8 devices, 8 x 1.
  manager = orbax_state.make_manager(str(tmp_path), async_save=False)
  orbax_state.save(manager, saved, {})
  mesh = parallel.make_mesh(4, model=2)  # 4 devices, 2 x 2.
  _, _, _, target = _init(mesh, 'fsdp+model')
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), saved, target)
  restored, _ = orbax_state.restore(manager, abstract)
  manager.close()
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert got.sharding == want
    assert set(got.devices()) == set(mesh.devices.flat)
  _assert_trees_close(_numpy(restored), _numpy(saved), atol=0)


def test_small_replicated_arrays_save_without_a_slice_per_replica(tmp_path):
  """Replicated over 8 devices, an array under MIN_REPLICA_SLICE_BYTES is
  written by one replica (no per-replica slicing, which compiled a small
  program per array and replica); a large one still by all 8, in slices."""
  mesh = parallel.make_mesh()
  replicated = parallel.replicated(mesh)
  small = jax.device_put(np.arange(8 * 41, dtype=np.float32).reshape(8, 41),
                         replicated)
  large = jax.device_put(np.ones((8, 2**18), np.float32), replicated)  # 8 MiB.
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  slices = {name: replica_slices.get_replica_slices(
      x, replica_id=0, use_replica_parallel=True,
      min_slice_bytes_for_replica_parallel=handler._min_slice_bytes_for_replica_parallel)
      for name, x in (('small', small), ('large', large))}
  assert [r.slice_args for r in slices['small'].replica_slices] == [None]
  large_slices = slices['large'].replica_slices  # One per replica (device).
  assert len(large_slices) == 8
  assert all(r.slice_args is not None for r in large_slices)
  manager = orbax_state.make_manager(str(tmp_path), async_save=False)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params={'w': small},
                           opt_state=(), rng=jnp.zeros((2,), jnp.uint32),
                           first_nonfinite_step=jnp.zeros((), jnp.int32),
                           nonfinite_steps=jnp.zeros((), jnp.int32))
  orbax_state.save(manager, state, {})
  restored, _ = orbax_state.restore(manager, jax.eval_shape(lambda: state))
  manager.close()
  np.testing.assert_array_equal(restored.params['w'], small)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


@pytest.mark.slow
def test_trainer_resumes_a_2d_sharded_run_with_replicated_params(data_dir, tmp_path):
  sharded = dict(sharding={'rules': 'fsdp+model', 'fsdp_min_size': 0},
                 mesh={'model': 2}, model={'num_layers': 1},
                 eval={'splits': 'test[:64]'}, total_steps=4,
                 checkpoint_every=2, eval_every=4)
  workdir = str(tmp_path / 'sharded')
  trainer.train_and_evaluate(tiny_config(data_dir, **sharded), workdir)
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '4'))  # Stopped at 2.
  trainer.train_and_evaluate(
      tiny_config(data_dir, **dict(sharded, sharding={'rules': 'replicate'},
                                   mesh={'model': 1})),
      resumed)
  _assert_trees_close(checkpoint.load_params(resumed), checkpoint.load_params(workdir))
  steps_logged = [r['step'] for r in metrics.read_metrics(resumed) if 'train_loss' in r]
  assert steps_logged == [2, 4]


def test_scanned_model_gets_the_same_specs_plus_a_layer_axis():
  mesh = parallel.make_mesh(model=2)
  rules = sharding.parse_rules('fsdp+model')
  plain = sharding.param_specs(_abstract_params(), rules, mesh, fsdp_min_size=0)
  scanned = sharding.param_specs(_abstract_params(scan_layers=True), rules, mesh,
                                 fsdp_min_size=0)
  name = 'MultiHeadDotProductAttention_1/query/kernel'
  assert scanned[f'Transformer/encoderblock/{name}'] == (
      (2,) + plain[f'Transformer/encoderblock_0/{name}'][0],
      P(None, *plain[f'Transformer/encoderblock_0/{name}'][1]))
  assert scanned['Transformer/encoderblock/MlpBlock_3/Dense_1/kernel'][1] == P(
      None, 'model', 'data')
