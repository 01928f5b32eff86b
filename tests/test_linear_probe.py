"""vit_jax.tools.linear_probe: probes a checkpoint, caches its features."""

import dataclasses
import json

import numpy as np
import pytest

from vit_jax import feature_cache
from vit_jax.tools import cli
from vit_jax.tools import linear_probe
from vit_jax.tools import loading


def _probe(tiny_run, cache_dir, *extra):
  return cli.run(linear_probe.define_flags, linear_probe.main, [
      'linear_probe', f'--workdir={tiny_run.workdir}', '--dataset=digits',
      f'--data_dir={tiny_run.data_dir}', f'--cache_dir={cache_dir}',
      '--test_split=test[:200]', *extra])


def _feature_lines(out):
  return [line.split(' (')[0] for line in out.splitlines()
          if line.startswith('features:')]


def test_features_are_reused_until_the_checkpoint_changes(tiny_run, tmp_path, capsys):
  cache, json_out = tmp_path / 'cache', tmp_path / 'probe.json'
  assert _probe(tiny_run, cache, '--shots=1,5', '--full',
                f'--json_out={json_out}') == 0
  first = capsys.readouterr().out
  assert _feature_lines(first) == ['features: computed train',
                                   'features: computed test[:200]']
  rows = json.loads(json_out.read_text())
  assert [r['probe'] for r in rows] == ['1-shot', '5-shot', 'full']
  assert all(0 <= r['top1'] <= 1 for r in rows)
  assert ' 5-shot ' in first and ' full ' in first
  # Other shots and l2 values: the same features.
  assert _probe(tiny_run, cache, '--shots=10', '--l2_reg=1,100') == 0
  assert _feature_lines(capsys.readouterr().out) == [
      'features: reused train', 'features: reused test[:200]']
  # Another checkpoint of the run: new features.
  assert _probe(tiny_run, cache, '--shots=1', '--step=4') == 0
  assert _feature_lines(capsys.readouterr().out) == [
      'features: computed train', 'features: computed test[:200]']


def test_the_key_covers_preprocessing_and_model(tiny_run):
  trained = loading.load_workdir(tiny_run.workdir)
  key = linear_probe.cache_key('d', trained, 'digits', 'train')
  cropped = dataclasses.replace(trained, pp=trained.pp.copy_and_resolve_references())
  cropped.pp.eval_crop_fraction = 0.875
  other_model = dataclasses.replace(trained, model_config=trained.model_config.copy_and_resolve_references())
  other_model.model_config.classifier = 'gap'
  for changed in (cropped, other_model):
    new = linear_probe.cache_key('d', changed, 'digits', 'train')
    assert feature_cache.cache_path('c', new) != feature_cache.cache_path('c', key)
  assert linear_probe.cache_key('e', trained, 'digits', 'train') != key


def _damage(path, how):
  key = json.loads(bytes(np.load(path)['key']).decode())
  if how == 'truncated':
    path.write_bytes(path.read_bytes()[:100])
  elif how == 'pickled':
    np.savez(path, features=np.array([object()]), labels=np.zeros(1), key=np.zeros(1))
  elif how == 'other_key':
    features, labels = np.zeros((3, 2), np.float32), np.zeros(3, np.int64)
    feature_cache.save(path, dict(key, dataset='other'), features, labels)
  elif how == 'nan':
    feature_cache.save(path, key, np.full((3, 2), np.nan, np.float32), np.zeros(3, np.int64))


@pytest.mark.parametrize('how, reason', [
    ('truncated', 'damaged'), ('pickled', 'damaged'),
    ('other_key', 'another key: dataset differ'), ('nan', 'NaN')])
def test_a_bad_cache_file_is_rebuilt_with_a_warning(tiny_run, tmp_path, capsys,
                                                     how, reason):
  cache = tmp_path / 'cache'
  assert _probe(tiny_run, cache, '--shots=1') == 0
  capsys.readouterr()
  (train_file,) = cache.glob('train-*.npz')
  _damage(train_file, how)
  assert _probe(tiny_run, cache, '--shots=1') == 0
  out, err = capsys.readouterr()
  assert 'warning: rebuilding the feature cache' in err and reason in err
  assert _feature_lines(out) == ['features: computed train',
                                 'features: reused test[:200]']
  feature_cache.load(train_file, json.loads(bytes(np.load(train_file)['key']).decode()))


@pytest.mark.parametrize('args, message', [
    (['--dataset=no_such_data'], "no_such_data"),
    (['--shots=1000'], '1000 shots'),
    (['--test_split=test[:0]'], 'holds no examples'),
])
def test_refusals_before_any_feature_pass(tiny_run, tmp_path, capsys, args, message):
  code = cli.run(linear_probe.define_flags, linear_probe.main, [
      'linear_probe', f'--workdir={tiny_run.workdir}', '--dataset=digits',
      f'--data_dir={tiny_run.data_dir}', f'--cache_dir={tmp_path}', *args])
  assert code == 1
  assert message in capsys.readouterr().err
  assert not list(tmp_path.glob('*.npz'))
