"""Training-recipe configs (vit_s16_i1k, augreg, deit_s) and the regularisers
they rely on: parsed as train.py parses them, checked against their sources'
numbers, and trained for a few steps on `tfds.testing.mock_data` with a tiny
model swapped in (the same approach and shrink as tests/test_paper_configs.py)."""

import ast
import glob
import os

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import augreg
from configs import common
from configs import deit_s
from configs import fashion_mnist_long
from configs import gfnet
from configs import vit_s16_i1k
from tiny import SHRINK
from tiny import parse_config as parse
from vit_jax import checkpoint
from vit_jax import config_keys
from vit_jax import evaluation
from vit_jax import metrics
from vit_jax import models
from vit_jax import param_rules
from vit_jax import run_setup
from vit_jax import trainer
from vit_jax.models import vit


# ------------------------------------------------------------------ recipes
def _assignments(path):
  """(line, dotted key, value) of each `config.<key> = <literal>` in a file."""
  for node in ast.walk(ast.parse(open(path).read())):
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
      continue
    target, parts = node.targets[0], []
    while isinstance(target, ast.Attribute):
      parts.append(target.attr)
      target = target.value
    if isinstance(target, ast.Name) and target.id == 'config' and parts:
      try:
        value = ast.literal_eval(node.value)
      except ValueError:
        continue  # Computed from the recipe's arguments.
      yield node.lineno, '.'.join(reversed(parts)), value


def test_recipes_set_only_what_differs_from_the_defaults():
  """Each config that starts from configs/common.py states its differences."""
  defaults = common.get_config()
  restated = []
  root = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs')
  for path in glob.glob(os.path.join(root, '**', '*.py'), recursive=True):
    source = open(path).read()
    if path.endswith('common.py') or 'common.get_config()' not in source:
      continue  # A recipe built on another recipe overrides that one.
    for line, key, value in _assignments(path):
      try:
        default = config_keys.lookup(defaults, key)
      except (KeyError, AttributeError):
        continue  # A key the defaults leave to the recipe (model fields).
      if type(value) is type(default) and value == default:
        restated.append(f'{os.path.relpath(path, root)}:{line} {key} = {value!r}')
  assert not restated, restated


@pytest.mark.parametrize('epochs', vit_s16_i1k.EPOCHS)
def test_plain_vit_baseline(epochs):
  config = parse(f'vit_s16_i1k.py:epochs={epochs}')
  assert parse(f'vit_s16_i1k.py:{epochs}').to_dict() == config.to_dict()
  assert config.total_epochs == epochs
  m = config.model
  assert (m.name, m.classifier, m.posemb, m.representation_size) == (
      'ViT-S_16', 'gap', 'sincos2d', 384)
  assert (config.optim.name, config.optim.b2, config.schedule.base_lr) == ('adamw', 0.999, 1e-3)
  # big_vision's decoupled wd 1e-4 is not lr-scaled; ours is: 1e-4 / lr.
  assert config.optim.weight_decay * config.schedule.base_lr == pytest.approx(1e-4)
  assert (config.batch_size, config.schedule.warmup_steps, config.schedule.name,
          config.optim.grad_clip_norm) == (1024, 10_000, 'cosine', 1.0)
  assert (config.pp.train_crop, config.pp.randaugment_layers,
          config.pp.randaugment_magnitude) == ('inception', 2, 10)
  assert (config.mixup.mixup_alpha, config.mixup.cutmix_alpha) == (0.2, 0.0)
  run_setup.check_config(config)


def test_augreg_levels_and_arguments():
  expected = {'none': (0, 0.0), 'light1': (2, 0.0), 'light2': (2, 0.2),
              'medium1': (2, 0.2), 'medium2': (2, 0.5), 'strong1': (2, 0.5),
              'strong2': (2, 0.8)}
  magnitudes = {'light1': 0, 'light2': 10, 'medium1': 15, 'medium2': 15,
                'strong1': 20, 'strong2': 20}
  for aug, (layers, alpha) in expected.items():
    config = parse(f'augreg.py:variant=S/32,aug={aug}')
    assert (config.pp.randaugment_layers, config.mixup.mixup_alpha) == (layers, alpha)
    if aug in magnitudes:
      assert config.pp.randaugment_magnitude == magnitudes[aug]
    run_setup.check_config(config)
  config = parse('augreg.py:variant=L/16,aug=strong1,wd=0.03,do=0.1,sd=0.1,data=i1k')
  assert (config.model.name, config.model.dropout_rate,
          config.model.stochastic_depth) == ('ViT-L_16', 0.1, 0.1)
  assert (config.optim.weight_decay, config.dataset) == (0.03, 'imagenet2012')
  default = parse('augreg.py')
  assert (default.model.name, default.dataset, default.batch_size,
          default.total_epochs, default.schedule.base_lr,
          default.optim.weight_decay) == (
              'ViT-B_16', 'imagenet21k', 4096, 300, 1e-3, 0.1)
  for bad in ('aug=extreme', 'variant=H/14', 'wd=0.5', 'lr=0.1', 'medium1'):
    with pytest.raises(ValueError, match='configs/augreg.py'):
      augreg.get_config(bad)
  with pytest.raises(ValueError, match='epochs'):
    vit_s16_i1k.get_config('epochs=100')


def test_deit_s():
  config = parse('deit_s.py')
  assert (config.model.name, config.model.stochastic_depth) == ('ViT-S_16', 0.1)
  assert (config.optim.name, config.schedule.base_lr, config.optim.weight_decay) == (
      'adamw', pytest.approx(1e-3), 0.05)
  assert (config.batch_size, config.total_epochs, config.schedule.warmup_steps) == (
      1024, 300, 6256)
  assert (config.train.label_smoothing, config.train.ema_decay) == (0.1, 0.99996)
  assert dict(config.mixup) == dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0,
                                    switch_prob=0.5)
  assert (config.pp.randaugment_layers, config.pp.randaugment_magnitude,
          config.pp.random_erase_prob) == (2, 9, 0.25)
  run_setup.check_config(config)


def test_gfnet_is_deit_with_the_official_differences(tmp_path):
  deit = parse('deit_s.py')
  for variant, drop_path in (('Ti', 0.0), ('XS', 0.0), ('S', 0.15), ('B', 0.25)):
    config = parse(f'gfnet.py:{variant}')
    assert config.model.name == f'GFNet-{variant}'
    built = models.create_model(config.model, 1000)
    assert (built.token_mixer, built.classifier, built.stochastic_depth) == (
        'global_filter', 'gap', drop_path)
    assert (config.optim.grad_clip_norm, config.pp.random_erase_prob,
            config.train.ema_decay) == (1.0, 0.0, 0.0)
    assert (config.schedule.base_lr, config.batch_size, config.mixup.mixup_alpha) == (
        deit.schedule.base_lr, deit.batch_size, deit.mixup.mixup_alpha)
    run_setup.check_config(config)
  with pytest.raises(ValueError, match='configs/gfnet.py:M'):
    gfnet.get_config('M')
  # The recipe trains end to end with the tiny GFNet (no cls token, filters).
  config = parse('gfnet.py:S')
  config.update(SHRINK)
  config.model.name = 'GFNet-test'
  config.model.num_layers = 1
  config.schedule.warmup_steps = 1
  workdir = str(tmp_path / 'w')
  with tfds.testing.mock_data(num_examples=16):
    final = trainer.train_and_evaluate(config, workdir)
  split = evaluation.split_name(config.eval.splits)
  assert np.isfinite(final[f'eval_{split}_top1'])
  params = checkpoint.load_params(workdir)
  assert params['Transformer']['encoderblock_0']['GlobalFilter_1'][
      'complex_weight'].shape == (2, 2, 32, 2)  # 8 px / patch 4: a 2x2 grid.


def test_paper_numbers_are_in_the_docstrings():
  numbers = [(vit_s16_i1k, f'{v}%') for v in vit_s16_i1k.PAPER_TOP1.values()]
  numbers += [(augreg, f'{v:.2f}%') for v in augreg.PAPER_TOP1.values()]
  numbers += [(deit_s, f'{deit_s.PAPER_TOP1}%')]
  numbers += [(gfnet, f'{v}%') for v in gfnet.PAPER_TOP1.values()]
  for module, number in numbers:
    assert number in module.__doc__, (module.__name__, number)
    assert 'paper number' in module.__doc__.lower()


def test_fashion_mnist_long_trains_its_own_model_offline(tmp_path):
  """The long recipe as written (conv-stem ViT, 28 px, pad crop, erasing, EMA)
  for 3 steps on the offline Fashion-MNIST files; only the length shrinks."""
  config = parse('fashion_mnist_long.py')
  assert fashion_mnist_long.__doc__ and config.model.conv_stem == (32, 64, 128)
  assert config.model.conv_stem_depth == 2
  assert (config.pp.train_crop, config.pp.crop_padding, config.train.ema_decay) == (
      'pad', 2, 0.999)
  run_setup.check_config(config)
  config.update(dict(batch_size=16, total_steps=3, log_every=1, eval_every=3,
                     checkpoint_every=3, metrics={'write_plot': False},
                     eval={'batch_size': 16, 'splits': 'test[:32]'}))
  config.total_epochs = None
  config.schedule.warmup_steps = 1
  workdir = str(tmp_path / 'w')
  final = trainer.train_and_evaluate(config, workdir)
  split = evaluation.split_name(config.eval.splits)
  assert final[f'eval_{split}_count'] == 32
  assert np.isfinite(final[f'eval_{split}_top1'])
  assert np.isfinite(final[f'eval_{split}_ema_top1'])


RUN_SPECS = ['vit_s16_i1k.py:epochs=90',
             'augreg.py:variant=S/16,aug=strong2,do=0.1,sd=0.1,data=i1k',
             'deit_s.py']


@pytest.mark.parametrize('spec', RUN_SPECS)
def test_runs_a_few_steps_on_mock_data(spec, tmp_path):
  config = parse(spec)
  config.update(SHRINK)
  config.model.name = 'ViT-test_4'  # The recipe (model fields, optimizer, pp) stays.
  config.model.num_layers = 1
  config.schedule.warmup_steps = 1
  workdir = str(tmp_path / 'w')
  with tfds.testing.mock_data(num_examples=16):
    final = trainer.train_and_evaluate(config, workdir)
  losses = [r['train_loss'] for r in metrics.read_metrics(workdir)
            if 'train_loss' in r]
  assert len(losses) == 3 and np.all(np.isfinite(losses))
  split = evaluation.split_name(config.eval.splits.split(',')[-1])
  assert np.isfinite(final[f'eval_{split}_top1'])
  has_ema = config.train.ema_decay > 0
  assert (f'eval_{split}_ema_top1' in final) == has_ema


# ------------------------------------------------------------------ regularisers
def _drop_path_rates(model, image_size=8):
  """Per encoder block, the DropPath rate the module was built with."""
  rates = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, vit.DropPath):
      # A field in older code, the call argument after x now.
      rate = getattr(context.module, 'rate', None)
      rates[context.module.path] = float(
          rate if rate is not None else kwargs.get('rate', args[1:2] and args[1]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.init, jax.random.key(0),
                   jnp.zeros((1, image_size, image_size, 3)))
  by_block = {}
  for path, rate in rates.items():
    block = next(p for p in path if p.startswith('encoderblock_'))
    by_block.setdefault(int(block.split('_')[1]), set()).add(rate)
  return by_block


def test_stochastic_depth_grows_linearly_over_the_blocks():
  # DeiT / timm: torch.linspace(0, rate, depth), both residual branches.
  model = models.create_model('ViT-test_4', 10, num_layers=4, stochastic_depth=0.3)
  by_block = _drop_path_rates(model)
  assert sorted(by_block) == [0, 1, 2, 3]
  for block, rates in by_block.items():
    assert len(rates) == 1
    np.testing.assert_allclose(rates.pop(), np.linspace(0, 0.3, 4)[block], atol=1e-9)


def test_default_wd_mask_decays_only_the_kernels_of_a_vit():
  model = models.create_model('ViT-B_16', 1000)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))['params']
  mask = param_rules.regex_mask(params, parse('deit_s.py').optim.wd_mask)
  paths = param_rules.tree_paths(params)
  decayed = {p for p, m in zip(jax.tree.leaves(paths), jax.tree.leaves(mask)) if m}
  kept = set(jax.tree.leaves(paths)) - decayed
  block = 'Transformer/encoderblock_0/'
  assert {p for p in decayed if p.startswith(block)} == {
      block + f'MultiHeadDotProductAttention_1/{n}/kernel'
      for n in ('query', 'key', 'value', 'out')} | {
      block + f'MlpBlock_3/Dense_{i}/kernel' for i in (0, 1)}
  assert {p for p in decayed if not p.startswith('Transformer/encoderblock_')} == {
      'embedding/kernel', 'head/kernel'}
  assert len(decayed) == 2 + 12 * 6
  for name in ('cls', 'Transformer/posembed_input/pos_embedding',
               'Transformer/encoder_norm/scale', 'Transformer/encoder_norm/bias',
               block + 'LayerNorm_0/scale', block + 'LayerNorm_2/bias',
               block + 'MultiHeadDotProductAttention_1/query/bias',
               block + 'MlpBlock_3/Dense_1/bias', 'embedding/bias', 'head/bias'):
    assert name in kept, name
  assert all(p.endswith('/kernel') for p in decayed)
