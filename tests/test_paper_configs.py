"""Paper configs: parsed as train.py parses them, built, and trained for a few
steps on `tfds.testing.mock_data` (no download), with a tiny model swapped in."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import augreg_finetune
from configs import vit_paper
from tiny import SHRINK
from tiny import parse_config as parse
from tiny import tiny_config
from vit_jax import checkpoint
from vit_jax import data
from vit_jax import evaluation
from vit_jax import metrics
from vit_jax import models
from vit_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = {'cifar10': 10, 'cifar100': 100, 'imagenet2012': 1000,
               'oxford_iiit_pet': 37, 'oxford_flowers102': 102}
SPECS = ([f'vit_paper.py:ViT-B_16,{d}' for d in vit_paper.TASKS]
         + ['vit_paper.py:ViT-B_32,imagenet2012', 'vit_paper.py:ViT-L_16,imagenet2012',
            'cifar.py:ViT-B_16,cifar10', 'cifar.py:ViT-B_16,cifar100', 'vit_b16.py']
         + [f'augreg_finetune.py:{v}' for v in augreg_finetune.VARIANTS])
# Runs: every task of the table, and the AugReg recipe once (its variants differ
# only in model, lr and start file, which a run swaps for tiny ones anyway;
# cifar.py and vit_b16.py are checked to be vit_paper.py's configs).
RUN_SPECS = ([f'vit_paper.py:ViT-B_16,{d}' for d in vit_paper.TASKS]
             + ['augreg_finetune.py:B_16'])
@functools.lru_cache(maxsize=None)
def abstract_params(model_name: str, image_size: int, num_classes: int):
  model = models.create_model(model_name, num_classes)
  return jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3))))['params']


@pytest.mark.parametrize('spec', SPECS)
def test_parses_with_the_paper_recipe_and_builds(spec):
  config = parse(spec)
  assert (config.optim.name, config.optim.momentum, config.batch_size) == (
      'sgd', 0.9, 512)
  assert (config.optim.grad_clip_norm, config.optim.weight_decay) == (1.0, 0.0)
  assert (config.schedule.name, config.input.image_size) == ('cosine', 384)
  assert (config.pp.train_crop, config.pp.flip, config.pp.eval_crop_fraction) == (
      'inception', True, 1.0)
  assert config.pretrained_path.startswith('gs://vit_models/')
  assert 0 < config.schedule.warmup_steps < config.total_steps
  params = abstract_params(config.model.name, 384, NUM_CLASSES[config.dataset])
  patch = models.get_model_config(config.model.name).patch_size[0]
  hidden = params['head']['kernel'].shape[0]
  assert params['head']['kernel'].shape == (hidden, NUM_CLASSES[config.dataset])
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (
      1, 1 + (384 // patch) ** 2, hidden)


def test_step_counts_and_rates_of_the_paper_table():
  steps = {d: parse(f'vit_paper.py:ViT-B_16,{d}').total_steps for d in vit_paper.TASKS}
  assert steps == {'cifar10': 10_000, 'cifar100': 10_000, 'imagenet2012': 20_000,
                   'oxford_iiit_pet': 500, 'oxford_flowers102': 500}
  # The older entry points are the same configs.
  assert parse('cifar.py:ViT-B_16,cifar100').to_dict() == parse(
      'vit_paper.py:ViT-B_16,cifar100').to_dict()
  b16 = parse('vit_b16.py')
  assert (b16.schedule.base_lr, b16.input.train_split, b16.eval.splits) == (
      0.03, 'train[:99%]', 'validation')
  augreg = parse('augreg_finetune.py:L_16')
  assert augreg.pretrained_path == ('gs://vit_models/augreg/L_16-i21k-300ep-lr_0.001-'
                                    'aug_strong1-wd_0.1-do_0.0-sd_0.0.npz')
  assert (augreg.model.name, augreg.schedule.base_lr, augreg.total_steps) == (
      'ViT-L_16', 0.01, 20_000)
  with pytest.raises(ValueError, match='dataset in'):
    vit_paper.get_config('ViT-B_16,mnist')
  with pytest.raises(ValueError, match='variant in'):
    augreg_finetune.get_config('H_14')


def test_paper_numbers_are_in_the_docstrings_and_the_recipes_page():
  with open(os.path.join(ROOT, 'docs', 'recipes.md')) as f:
    recipes = f.read()
  section = recipes[recipes.index('## Paper configs'):]
  numbers = [(vit_paper.__doc__, v) for v in vit_paper.PAPER_TOP1.values()]
  numbers += [(augreg_finetune.__doc__, v.paper_top1)
              for v in augreg_finetune.VARIANTS.values()]
  for doc, number in numbers:
    assert f'{number:.2f}%' in doc and f'{number:.2f}%' in section
  assert 'paper number' in section.lower()
  for name in ('vit_paper.py', 'augreg_finetune.py', 'cifar.py', 'vit_b16.py'):
    assert f'configs/{name}' in section


@pytest.fixture(scope='module')
def tiny_pretrained(tmp_path_factory):
  """A one-layer ViT-test_4 'pre-trained' at 16 px with 7 classes: fine-tuning
  at 8 px replaces the head and resizes the position embedding."""
  model = models.create_model('ViT-test_4', 7, num_layers=1)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)))['params']
  path = str(tmp_path_factory.mktemp('pretrained') / 'tiny.npz')
  checkpoint.save_npz(path, jax.device_get(params))
  return path


@pytest.mark.parametrize('spec', RUN_SPECS)
def test_runs_a_few_steps_on_mock_data(spec, tiny_pretrained, tmp_path):
  config = parse(spec)
  config.update(SHRINK)
  config.model.name = 'ViT-test_4'  # The recipe (optimizer, schedule, pp) stays.
  config.model.num_layers = 1
  config.schedule.warmup_steps = 1
  config.pretrained_path = tiny_pretrained
  with tfds.testing.mock_data(num_examples=16):
    final = trainer.train_and_evaluate(config, str(tmp_path / 'w'))
  split = evaluation.split_name(config.eval.splits)
  assert final[f'eval_{split}_count'] == 16
  losses = [r['train_loss'] for r in metrics.read_metrics(str(tmp_path / 'w'))
            if 'train_loss' in r]
  assert len(losses) == 3 and np.all(np.isfinite(losses))
  head = checkpoint.load_params(str(tmp_path / 'w'))['head']['kernel']
  assert head.shape == (32, NUM_CLASSES[config.dataset])


def test_as_dataset_reader_gives_the_same_data_as_the_shards(tmp_path):
  """config.input.tfds_reader='as_dataset' (what mock_data needs) on real data."""
  shards = tiny_config(tmp_path, eval={'batch_size': 100})
  other = tiny_config(tmp_path, eval={'batch_size': 100},
                      input={'tfds_reader': 'as_dataset'})
  assert data.get_dataset_info(other) == data.get_dataset_info(shards)
  for a, b in zip(data.eval_iterator(shards, 'test', local_batch_size=100),
                  data.eval_iterator(other, 'test', local_batch_size=100)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  first = lambda c: next(data.train_iterator(c, local_batch_size=16))
  for key, value in first(shards).items():  # cache=True: same decoded split
    np.testing.assert_array_equal(value, first(other)[key])
  with pytest.raises(ValueError, match='tfds_reader'):
    data.check_config(tiny_config(tmp_path, input={'tfds_reader': 'files'}))
