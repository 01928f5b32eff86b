"""Few-shot ridge probes (vit_jax.fewshot) and best checkpoints in a run."""

import json

import numpy as np
import pytest

from tiny import tiny_config
from vit_jax import checkpoint
from vit_jax import fewshot
from vit_jax import run_setup
from vit_jax import trainer
from vit_jax.checkpoint import best
from vit_jax.config_checks import ConfigError


@pytest.fixture
def data_dir(tiny_run):
  return tiny_run.data_dir


def _clusters(rng, num_classes, per_class, dim, noise):
  centres = rng.normal(size=(num_classes, dim)) * 3
  labels = np.repeat(np.arange(num_classes), per_class)
  return centres[labels] + noise * rng.normal(size=(labels.size, dim)), labels


def test_ridge_matches_the_closed_form_in_both_forms():
  rng = np.random.default_rng(0)
  for n, d in ((12, 40), (60, 8)):  # Dual form (n < d) and primal form.
    x, y = rng.normal(size=(n, d)), rng.integers(0, 3, n)
    fit = fewshot.RidgeFit.of(x, y, 3)
    z, t = fit.features, fit.targets
    expected = np.linalg.solve(z.T @ z + 7.0 * np.eye(d + 1), z.T @ t)
    np.testing.assert_allclose(fit.weights(7.0), expected, rtol=1e-6, atol=1e-8)


def test_fewshot_recovers_linear_structure():
  rng = np.random.default_rng(1)
  train = _clusters(rng, 5, 40, 16, noise=0.5)
  test = _clusters(np.random.default_rng(1), 5, 40, 16, noise=0.5)
  top1 = fewshot.fewshot_top1(train, test, num_classes=5, shots=(1, 10),
                              seeds=3, l2_regs=(1.0,))
  assert top1[(10, 1.0)] > 0.97
  # Labels that carry no structure: about chance.
  shuffled = (train[0], rng.permutation(train[1]))
  chance = fewshot.fewshot_top1(shuffled, test, num_classes=5, shots=(10,),
                                seeds=3, l2_regs=(1.0,))
  assert chance[(10, 1.0)] < 0.5


def test_sample_shots_draws_per_class_and_depends_on_the_seed():
  labels = np.array([0] * 6 + [1] * 4 + [2] * 5)
  picked = fewshot.sample_shots(labels, 3, seed=0)
  assert np.bincount(labels[picked]).tolist() == [3, 3, 3]
  np.testing.assert_array_equal(picked, fewshot.sample_shots(labels, 3, seed=0))
  assert not np.array_equal(picked, fewshot.sample_shots(labels, 3, seed=1))
  with pytest.raises(ValueError, match='class 1 has 4 examples'):
    fewshot.sample_shots(labels, 5, seed=0)


@pytest.mark.parametrize('fs, message', [
    (dict(datasets='no_such_dataset'), "dataset 'no_such_dataset'"),
    (dict(datasets='digits', test_split='test[:0]'), "split 'test\\[:0\\]' holds no"),
    (dict(datasets='digits', shots=(500,)), '500 shots, but in'),
    (dict(datasets='digits', train_split='nope'), "Split 'nope'"),
])
def test_prepare_refuses_bad_data_before_anything_compiles(data_dir, fs, message):
  config = tiny_config(data_dir, fewshot=fs)
  with pytest.raises(ConfigError, match=message):
    fewshot.prepare(config)


@pytest.mark.parametrize('overrides, message', [
    (dict(fewshot={'shots': (0,)}), 'fewshot.shots'),
    (dict(fewshot={'seeds': 0}), 'fewshot.seeds'),
    (dict(checkpoint={'keep_best': 2, 'best_metric': 'eval_tset_top1'}),
     "best_metric 'eval_tset_top1' is not a metric"),
    (dict(checkpoint={'keep_best': 1, 'best_mode': 'up'}), 'best_mode'),
])
def test_config_checks(data_dir, overrides, message):
  with pytest.raises(ConfigError, match=message):
    run_setup.check_config(tiny_config(data_dir, **overrides))


def _logged(workdir, name):
  rows = [json.loads(line) for line in open(f'{workdir}/metrics.jsonl')]
  return {r['step']: r[name] for r in rows if name in r}


def test_run_logs_fewshot_and_keeps_the_best_steps_across_a_restart(
    data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  metric = 'fewshot_digits_5shot'
  overrides = dict(
      eval_every=2, fewshot={'datasets': 'digits', 'shots': (1, 5), 'seeds': 2,
                             'test_split': 'test[:200]'},
      checkpoint={'keep_best': 2, 'best_metric': metric})
  final = trainer.train_and_evaluate(tiny_config(data_dir, total_steps=6,
                                                 **overrides), workdir)
  assert 0.1 < final[metric] <= 1 and 'fewshot_digits_1shot' in final
  # The run goes on (a longer duration): its earlier best steps still count.
  trainer.train_and_evaluate(tiny_config(data_dir, total_steps=10,
                                         **overrides), workdir)
  scores = _logged(workdir, metric)
  assert sorted(scores) == [2, 4, 6, 8, 10]
  top2 = sorted(scores, key=scores.get, reverse=True)[:2]
  directory, step = best.best_step(workdir)
  assert sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit()) == sorted(top2)
  assert step == top2[0]
  params = checkpoint.load_params(workdir, 'best')
  assert params.keys() == checkpoint.load_params(workdir).keys()
  meta = checkpoint.workdir_reader.load_meta(workdir, 'best')
  assert meta['best_value'] == pytest.approx(scores[top2[0]])
  assert set(meta['digest']) >= {'params', 'train'}  # linear_probe's cache key.


def test_best_step_of_a_run_without_best_checkpoints(tiny_run):
  with pytest.raises(FileNotFoundError, match='keep_best = 0'):
    checkpoint.load_params(tiny_run.workdir, 'best')
