"""Pruning (vit_jax.pruning): schedule, the three mask kinds, exactness through
the optimizers, sharding and resume of the masks, refusals, and export with
pruned heads dropped."""

import functools
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vit_jax import checkpoint
from vit_jax import metrics
from vit_jax import models
from vit_jax import optim
from vit_jax import parallel
from vit_jax import param_rules
from vit_jax import pruning
from vit_jax import run_setup
from vit_jax import sharding
from vit_jax import steps
from vit_jax import trainer
from vit_jax.checkpoint import orbax_state
from vit_jax.config_checks import ConfigError
from vit_jax.models import head_counts
from vit_jax.tools import cli
from vit_jax.tools import evaluate
from vit_jax.tools import export
from vit_jax.tools import loading

from tiny import step_config
from tiny import tiny_config

BLOCK = 'Transformer/encoderblock_0'
ATTENTION = BLOCK + '/MultiHeadDotProductAttention_1'


def _pruning(**overrides):
  section = dict(method='magnitude', sparsity=0.5, rules='.*/kernel', n=2, m=4,
                 begin_step=0, end_step=None, update_every=1)
  return ml_collections.ConfigDict(dict(section, **overrides))


def _tree(flat):
  """{'a/b': x} -> {'a': {'b': x}} with jnp leaves."""
  tree = {}
  for name, value in flat.items():
    *parents, leaf = name.split('/')
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = jnp.asarray(value, jnp.float32)
  return tree


def _flat(tree):
  names = jax.tree.leaves(param_rules.tree_paths(tree))
  return dict(zip(names, (np.asarray(x) for x in jax.tree.leaves(tree))))


def _prune_once(params, section, total_steps=10):
  """One pruning update with zero updates: the masked params and the state."""
  tx = pruning.prune(section, total_steps)
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params),
                             params)
  return _flat(optax.apply_updates(params, updates)), state


# ---------------------------------------------------------------- schedule


def test_the_schedule_is_zhu_and_gupta_cubic_and_updates_on_its_steps():
  for step, want in [(0, 0.0), (10, 0.0), (35, 0.8 * (1 - 0.5**3)),
                     (55, 0.8 * (1 - 0.1**3)), (60, 0.8), (99, 0.8)]:
    np.testing.assert_allclose(pruning.target_sparsity(step, 0.8, 10, 60), want,
                               rtol=1e-6)
  due = [s for s in range(1, 80) if pruning.is_update_step(s, 10, 60, 20)]
  assert due == [10, 30, 50, 60]
  due = [s for s in range(1, 12) if pruning.is_update_step(s, 0, 7, 3)]
  assert due == [1, 3, 6, 7]  # The first step of the span, every 3, the end.


def test_magnitude_masks_reach_the_schedule_exactly_at_each_update_step():
  rng = np.random.default_rng(0)
  params = _tree({f'{BLOCK}/MlpBlock_3/Dense_0/kernel': rng.normal(size=(6, 10)),
                  'head/kernel': rng.normal(size=(4, 3)),
                  'head/bias': rng.normal(size=(3,))})
  section = _pruning(sparsity=0.7, rules=r'(Transformer|head)/.*kernel',
                     end_step=9, update_every=3)
  tx = optax.chain(optax.sgd(0.01, momentum=0.9), pruning.prune(section, 12))
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  zeros, due = [], [1, 3, 6, 9]
  for t in range(1, 13):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape),
                                               jnp.float32), params)
    updates, state = step(params, state, grads)
    params = optax.apply_updates(params, updates)
    flat = _flat(params)
    level = float(pruning.target_sparsity(min(max(d for d in due if d <= t), 9),
                                          0.7, 0, 9))
    for name in ('head/kernel', f'{BLOCK}/MlpBlock_3/Dense_0/kernel'):
      size = flat[name].size
      assert np.sum(flat[name] == 0) == int(np.round(np.float32(level) * size)), (t, name)
    assert np.all(flat['head/bias'] != 0)  # Not selected by the rule.
    zeros.append(int(np.sum(flat['head/kernel'] == 0)))
    total = 12 + 60
    want = (int(np.round(np.float32(level) * 12))
            + int(np.round(np.float32(level) * 60))) / total
    np.testing.assert_allclose(pruning.pruned_fraction(state), want, rtol=1e-6)
  assert zeros[-1] == round(0.7 * 12) and zeros == sorted(zeros)


# ---------------------------------------------------------------- mask kinds


def test_n_of_m_keeps_the_largest_n_of_every_group_along_the_input_axis():
  rng = np.random.default_rng(1)
  # Input axes: Dense [in, out] -> 0; q/k/v [hidden, heads, head_dim] -> 0;
  # out [heads, head_dim, hidden] -> (0, 1); conv -> all but the last; a
  # scanned kernel per layer.
  shapes = {f'{BLOCK}/MlpBlock_3/Dense_0/kernel': ((8, 3), 1),
            f'{ATTENTION}/query/kernel': ((8, 2, 4), 1),
            f'{ATTENTION}/out/kernel': ((2, 4, 8), 2),
            'conv/kernel': ((2, 2, 2, 3), 3),
            'Transformer/encoderblock/MlpBlock_3/Dense_1/kernel': ((2, 12, 5), 1)}
  params = _tree({n: rng.normal(size=s) for n, (s, _) in shapes.items()})
  pruned, _ = _prune_once(params, _pruning(method='n_m', n=2, m=4))
  before = _flat(params)
  for name, (shape, input_axes) in shapes.items():
    w, got = before[name], pruned[name]
    if not name.startswith('Transformer/encoderblock/'):
      w, got = w[None], got[None]  # One layer.
    for w_layer, got_layer in zip(w, got):
      rows = int(np.prod(w_layer.shape[:input_axes]))
      groups = np.abs(w_layer).reshape(rows // 4, 4, -1)
      want = np.zeros(groups.shape, bool)
      np.put_along_axis(want, np.argsort(-groups, axis=1)[:, :2], True, axis=1)
      np.testing.assert_array_equal(got_layer.reshape(groups.shape) != 0, want,
                                    err_msg=name)


def _attention(scales, hidden=4, head_dim=2, rng=None, prefix=ATTENTION):
  """Params of one attention module whose head h is scaled by scales[h]."""
  rng = rng or np.random.default_rng(2)
  heads = len(scales)
  c = np.asarray(scales, np.float32)
  return {f'{prefix}/{p}/kernel': rng.normal(size=(hidden, heads, head_dim))
          * c[None, :, None] for p in ('query', 'key', 'value')} | {
              f'{prefix}/{p}/bias': rng.normal(size=(heads, head_dim)) * c[:, None]
              for p in ('query', 'key', 'value')} | {
                  f'{prefix}/out/kernel': rng.normal(size=(heads, head_dim, hidden))
                  * c[:, None, None],
                  f'{prefix}/out/bias': rng.normal(size=(hidden,))}


def test_head_pruning_zeroes_whole_heads_the_lowest_norm_ones():
  scanned = 'Transformer/encoderblock/MultiHeadDotProductAttention_1'
  flat = _attention([3.0, 0.1, 4.0, 0.2])
  stacked = [_attention(s, rng=np.random.default_rng(i), prefix=scanned)
             for i, s in enumerate([[0.1, 5, 5, 0.2], [5, 5, 0.1, 0.2]])]
  flat.update({k: np.stack([layer[k] for layer in stacked]) for k in stacked[0]})
  # The rule selects the modules through one of their params.
  pruned, state = _prune_once(_tree(flat), _pruning(
      method='heads', rules='.*/query/kernel', end_step=1))
  for prefix, layer, gone in [(ATTENTION, None, {1, 3}), (scanned, 0, {0, 3}),
                              (scanned, 1, {2, 3})]:
    pick = (lambda x: x) if layer is None else (lambda x, i=layer: x[i])
    for p in ('query', 'key', 'value'):
      kernel, bias = pick(pruned[f'{prefix}/{p}/kernel']), pick(pruned[f'{prefix}/{p}/bias'])
      for h in range(4):
        assert np.all(kernel[:, h] == 0) == (h in gone)
        assert np.all(bias[h] == 0) == (h in gone)
    out = pick(pruned[f'{prefix}/out/kernel'])
    assert [bool(np.all(out[h] == 0)) for h in range(4)] == [h in gone for h in range(4)]
    np.testing.assert_array_equal(pick(pruned[f'{prefix}/out/bias']),
                                  pick(flat[f'{prefix}/out/bias']).astype(np.float32))
  assert float(state.pruned_fraction) == 0.5  # Two of four heads, every slice.


# ---------------------------------------------------------------- optimizers


@pytest.mark.parametrize('optim_section', [
    {'name': 'adamw', 'weight_decay': 0.1},
    {'name': 'adam', 'weight_decay': 0.1},
    {'name': 'sgd', 'momentum': 0.9, 'nesterov': True, 'weight_decay': 0.1}])
def test_pruned_weights_stay_exactly_zero_through_the_optimizer(optim_section):
  config = step_config(optim=optim_section, pruning=dict(
      method='magnitude', sparsity=0.5, begin_step=0, end_step=2, update_every=1))
  tx, _ = optim.make_optimizer(config, total_steps=10)
  rng = np.random.default_rng(3)
  params = _tree({f'{BLOCK}/MlpBlock_3/Dense_0/kernel': rng.normal(size=(8, 4)),
                  'head/kernel': rng.normal(size=(4, 3))})
  state = tx.init(params)
  update = jax.jit(lambda p, s, g: tx.update(g, s, p))
  name = f'{BLOCK}/MlpBlock_3/Dense_0/kernel'
  for t in range(1, 9):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape),
                                               jnp.float32) + 1.0, params)
    updates, state = update(params, state, grads)
    params = optax.apply_updates(params, updates)
    zero = _flat(params)[name] == 0
    if t == 2:
      mask = zero
    if t >= 2:  # The mask is final: the same weights, exactly zero.
      np.testing.assert_array_equal(zero, mask)
  assert mask.sum() == 16
  assert np.all(_flat(params)['head/kernel'] != 0)  # Outside the default rule.
  none, _ = optim.make_optimizer(step_config(), total_steps=10)
  assert pruning.pruned_fraction(none.init(params)) is None


def test_masks_are_sharded_like_their_params_and_train_on_a_2d_mesh(tmp_path):
  config = tiny_config(tmp_path, model={'num_layers': 1}, pruning=dict(
      method='magnitude', sparsity=0.5, end_step=1))
  model = models.create_model(config.model, 10)
  tx, _ = optim.make_optimizer(config, total_steps=8)
  image_shape = (16, 16, 1)
  init = functools.partial(steps.create_train_state, model, tx, image_shape, 0)
  abstract = jax.eval_shape(init)
  pruned = set(pruning.pruned_names(abstract.params, config.pruning))
  for rules, model_size in (('fsdp', 1), ('model', 2), ('fsdp+model', 2)):
    mesh = parallel.make_mesh(data=8 // model_size, model=model_size)
    shardings = sharding.state_shardings(abstract, mesh, rules, fsdp_min_size=0)
    masks = next(s for s in jax.tree.leaves(
        shardings.opt_state, is_leaf=lambda x: isinstance(x, pruning.PruneState))
                 if isinstance(s, pruning.PruneState)).masks
    names = jax.tree.leaves(param_rules.tree_paths(abstract.params))
    split = 0
    for name, param, mask in zip(names, jax.tree.leaves(shardings.params),
                                 jax.tree.leaves(masks)):
      want = param.spec if name in pruned else jax.sharding.PartitionSpec()
      assert mask.spec == want, (rules, name)
      split += name in pruned and any(param.spec)
    assert split, rules
  # One step on the 2-D mesh: the pruned params come out exactly half zero.
  step = jax.jit(steps.make_train_step(model, tx, num_classes=10),
                 in_shardings=(shardings, parallel.batch_sharding(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)))
  rng = np.random.default_rng(0)
  batch = {'image': rng.uniform(-1, 1, (16,) + image_shape).astype(np.float32),
           'label': rng.integers(0, 10, 16).astype(np.int32)}
  state, step_metrics = step(jax.jit(init, out_shardings=shardings)(),
                             parallel.to_global_batch(batch, mesh))
  flat = _flat(jax.device_get(state.params))
  for name in pruned:
    assert np.sum(flat[name] == 0) == flat[name].size // 2, name
  assert float(step_metrics['pruned_fraction']) == 0.5


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize('section,message', [
    (dict(sparsity=1.0), r'config.pruning.sparsity must be in \[0, 1\), got 1.0'),
    (dict(sparsity=-0.1), r'config.pruning.sparsity must be in \[0, 1\), got -0.1'),
    (dict(n=4, m=4), 'config.pruning.n must be < config.pruning.m'),
    (dict(method='random'), "config.pruning.method 'random' not in"),
    (dict(rules='(unclosed'), 'config.pruning.rules .* is not a regex'),
    (dict(begin_step=5, end_step=2), 'config.pruning.end_step must be'),
])
def test_bad_pruning_keys_are_refused_by_check_config(tmp_path, section, message):
  config = tiny_config(tmp_path, pruning=dict(dict(method='magnitude'), **section))
  with pytest.raises(ConfigError, match=message):
    run_setup.check_config(config)


@pytest.mark.parametrize('section,model,message', [
    (dict(method='magnitude', rules='Transformer/nothing/.*'), {},
     r"config.pruning.rules 'Transformer/nothing/\.\*' matches no parameter; "
     r"parameter names look like \['Transformer/encoderblock_0/MlpBlock_3/"),
    (dict(method='heads', rules='head/.*'), {},
     "selects no attention module's query/key/value/out parameter"),
    (dict(method='n_m', rules=f'{BLOCK}/MlpBlock_3/Dense_1/kernel'), {'mlp_dim': 6},
     f'config.pruning.m=4 does not divide the input dimension 6 of '
     f'{BLOCK}/MlpBlock_3/Dense_1/kernel'),
    (dict(method='heads', sparsity=0.75), {},
     rf'prunes round\(0.75 \* 2\) = 2 of the 2 heads of {ATTENTION}: all of them'),
    (dict(method='magnitude', end_step=9), {},
     'config.pruning.end_step 9 exceeds config.total_steps 8'),
])
def test_pruning_that_cannot_apply_is_refused_before_compiling(
    tmp_path, section, model, message):
  config = tiny_config(tmp_path, pruning=section, model=model)
  run_setup.check_config(config)  # The keys alone are fine.
  with pytest.raises(ConfigError, match=message):
    run_setup.build(config, parallel.make_mesh(), num_classes=10, total_steps=8)


# ---------------------------------------------------------------- end to end

HEADS = dict(method='heads', sparsity=0.5, end_step=6, update_every=2)


def _restored_state(config, workdir):
  run = run_setup.build(config, parallel.make_mesh(), num_classes=10,
                        total_steps=config.total_steps)
  with orbax_state.make_manager(str(workdir)) as manager:
    state, _ = orbax_state.restore_latest(
        manager, run.abstract_state, workdir=str(workdir),
        check_meta=lambda meta: orbax_state.check_resume_meta(meta, config))
  return jax.device_get(state)


@pytest.fixture(scope='module')
def heads_run(tiny_run, tmp_path_factory):
  """tiny_config with head pruning: 8 steps straight, and 4 + a resume to 8."""
  root = tmp_path_factory.mktemp('heads')
  config = tiny_config(tiny_run.data_dir, pruning=HEADS, eval_every=8)
  straight, resumed = root / 'straight', root / 'resumed'
  trainer.train_and_evaluate(config, str(straight))
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '8')
  trainer.train_and_evaluate(config, str(resumed))
  return types.SimpleNamespace(config=config, straight=str(straight),
                               resumed=str(resumed), root=root)


def test_a_pruned_run_resumes_bitwise_masks_and_all(heads_run):
  want = _restored_state(heads_run.config, heads_run.straight)
  got = _restored_state(heads_run.config, heads_run.resumed)
  assert int(got.step) == 8
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  fractions = {r['step']: r['pruned_fraction']
               for r in metrics.read_metrics(heads_run.straight) if 'train_loss' in r}
  # Step 2 (round(0.35 * 2) = 1 head per block) on: half of every attention
  # module's q/k/v kernels and biases and out kernel.
  assert fractions == {2: 0.5, 4: 0.5, 6: 0.5, 8: 0.5}
  params = want.params['Transformer']
  for i in (0, 1):
    attention = params[f'encoderblock_{i}']['MultiHeadDotProductAttention_1']
    assert export.zero_heads(attention).tolist().count(True) == 1


def test_export_reports_sparsity_and_drops_the_pruned_heads(heads_run, capsys):
  out = str(heads_run.root / 'small.npz')
  assert cli.run(export.define_flags, export.main, [
      'export', f'--workdir={heads_run.straight}', f'--out={out}',
      '--drop_pruned_heads']) == 0
  printed = capsys.readouterr().out
  assert "pruning 'heads' (target sparsity 0.5)" in printed
  assert f'  {ATTENTION}/query/kernel (32, 2, 16): 0.5000' in printed
  assert f'  {ATTENTION}/out/kernel (2, 16, 32): 0.5000' in printed
  assert 'Transformer/encoderblock_1 1/2' in printed
  small = checkpoint.load_npz(out)
  assert head_counts.heads_from_params(small) == dict(num_heads=1, head_dim=16)
  # The smaller model computes the masked model's logits.
  trained = loading.load_workdir(heads_run.straight)
  released = loading.load_released(out, 'ViT-test_4', 16)
  assert released.model.num_heads == 1 and released.model.head_dim == 16
  images = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 1)).astype(np.float32)
  logits = [m.model.apply({'params': m.params}, images) for m in (trained, released)]
  np.testing.assert_allclose(logits[1], logits[0], atol=1e-5, rtol=1e-5)
  # And evaluates as the run did, with the run's config.
  results = evaluate.evaluate_checkpoint(heads_run.config, out)
  logged = [r for r in metrics.read_metrics(heads_run.straight)
            if 'eval_test_top1' in r][-1]
  assert results['eval_test_top1'] == logged['eval_test_top1']


def test_per_block_head_counts_load_from_a_file_and_refuse_scan(tmp_path):
  model = models.create_model('ViT-test_4', 10, num_heads=(1, 2), head_dim=16)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes['params'])
  path = str(tmp_path / 'uneven.npz')
  checkpoint.save_npz(path, params)
  loaded = loading.load_released(path, 'ViT-test_4', 16)
  assert loaded.model.num_heads == (1, 2) and loaded.model.head_dim == 16
  with pytest.raises(ValueError, match='cannot run with scan_layers=True'):
    models.create_model('ViT-test_4', 10, num_heads=(1, 2), head_dim=16,
                        scan_layers=True)
  with pytest.raises(ValueError, match='needs head_dim'):
    models.create_model('ViT-test_4', 10, num_heads=(1, 2))
