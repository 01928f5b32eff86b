"""End to end: train.py and train_and_evaluate on real offline data (digits)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import config_checks
from vit_jax import metrics
from vit_jax import trainer
from vit_jax import workdir as workdir_lib

from tiny import quickstart_on_digits
from tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tiny_run):
  return tiny_run.data_dir


@pytest.fixture(scope='module')
def finished_run(tiny_run):
  """(workdir, final metrics) of tiny_config's 8 steps (shared; copy to change)."""
  return tiny_run.workdir, tiny_run.final


def test_metrics_jsonl_has_the_contract_names(finished_run):
  workdir, final = finished_run
  records = metrics.read_metrics(workdir)
  train = [r for r in records if 'train_loss' in r]
  evals = [r for r in records if 'eval_test_top1' in r]
  assert [r['step'] for r in train] == [2, 4, 6, 8]
  assert [r['step'] for r in evals] == [4, 8]
  for r in train:
    assert {'train_loss', 'learning_rate', 'img_per_sec', 'mfu'} <= set(r)
    assert all(isinstance(v, (int, float)) for v in r.values())
  for r in evals:
    assert {'eval_test_top1', 'eval_test_top5', 'eval_test_loss'} <= set(r)
  # Every one of the 500 test digits counted, none twice (last batch padded).
  assert evals[-1]['eval_test_count'] == 500
  assert final['eval_test_top1'] == evals[-1]['eval_test_top1']
  assert 0.0 <= final['eval_test_top1'] <= final['eval_test_top5'] <= 1.0
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      json.loads(line)  # Valid JSON, line by line.


def test_checkpoints_and_load_params(finished_run):
  workdir, _ = finished_run
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '8']
  latest = checkpoint.load_params(workdir)
  at_4 = checkpoint.load_params(os.path.join(workdir, 'checkpoints'), step=4)
  assert latest['head']['kernel'].shape == (32, 10)
  assert isinstance(latest['head']['kernel'], np.ndarray)
  assert not np.array_equal(latest['head']['kernel'], at_4['head']['kernel'])
  with pytest.raises(ValueError, match='no checkpoint for step 5'):
    checkpoint.load_params(workdir, step=5)


def test_resume_continues_to_the_same_parameters(finished_run, data_dir, tmp_path):
  workdir, _ = finished_run
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '8'))  # "Killed" after step 4.
  trainer.train_and_evaluate(tiny_config(data_dir), resumed)
  want, got = checkpoint.load_params(workdir), checkpoint.load_params(resumed)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  steps = [r['step'] for r in metrics.read_metrics(resumed) if 'train_loss' in r]
  assert steps == [2, 4, 6, 8]  # Lines after the checkpoint were not duplicated.


def test_rerunning_a_finished_workdir_trains_nothing(finished_run, data_dir, tmp_path):
  workdir, final = finished_run
  again = str(tmp_path / 'again')
  shutil.copytree(workdir, again)
  assert trainer.train_and_evaluate(tiny_config(data_dir), again) == final
  assert sorted(os.listdir(os.path.join(again, 'checkpoints'))) == ['4', '8']


def test_resume_refuses_a_different_run(finished_run, data_dir, tmp_path):
  workdir, _ = finished_run
  other = str(tmp_path / 'other')
  shutil.copytree(workdir, other)
  with pytest.raises(config_checks.ConfigError, match='batch_size: checkpoint 32 vs config 64'):
    trainer.train_and_evaluate(tiny_config(data_dir, batch_size=64), other)


def test_shard_map_and_accumulation_run_end_to_end(data_dir, tmp_path):
  final = trainer.train_and_evaluate(
      tiny_config(data_dir, total_steps=2, eval_every=2, checkpoint_every=2,
                  train={'parallelism': 'shard_map', 'accum_steps': 2}),
      str(tmp_path / 'w'))
  assert final['eval_test_count'] == 500


@pytest.mark.parametrize('overrides,message', [
    (dict(batch_size=12), 'batch_size 12 is not divisible by the 8 devices'),
    (dict(input={'image_size': 18}),
     'image size 18 is not divisible by the patch size 4x4'),
    (dict(dataset='no_such_dataset'), 'no_such_dataset'),
    (dict(eval={'splits': 'validation'}), 'validation'),
    (dict(schedule={'base_lr': -1.0}), 'config.schedule.base_lr must be a positive'),
    (dict(total_steps=0), 'config.total_steps must be a positive integer'),
])
def test_bad_input_fails_before_compiling(data_dir, tmp_path, overrides, message):
  config = tiny_config(data_dir)
  config.update(overrides)
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    trainer.train_and_evaluate(config, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_workdir_errors(tmp_path):
  with pytest.raises(config_checks.ConfigError, match='parent directory .* does not exist'):
    workdir_lib.prepare_workdir(str(tmp_path / 'missing' / 'run'))
  blocked = tmp_path / 'file'
  blocked.write_text('x')
  with pytest.raises(config_checks.ConfigError, match='not a directory'):
    workdir_lib.prepare_workdir(str(blocked))


def _run_train_py(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, 'train.py', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def _tiny_quickstart(workdir, data_dir, *extra, **model):
  """train.py flags: the quickstart config shrunk to a 1-block ViT on 16 px digits."""
  return quickstart_on_digits(
      data_dir, f'--workdir={workdir}', '--config.model.num_layers=1',
      '--config.model.hidden_size=32', '--config.model.mlp_dim=32',
      '--config.schedule.warmup_steps=1', '--config.batch_size=16',
      '--config.eval.batch_size=100', *extra, **model)


def test_train_py_applies_overrides_and_cpu_devices_and_writes_the_workdir(
    data_dir, tmp_path):
  # One process for both: the overrides reach the run, and config.mesh.cpu_devices
  # splits the CPU before JAX starts (the conv stem is the quickstart's kind).
  workdir = tmp_path / 'cli'
  proc = _run_train_py(*_tiny_quickstart(
      workdir, data_dir, '--config.total_steps=3', '--config.log_every=1',
      '--config.metrics.write_plot=True', conv_stem='(8,)', patch_size='(2,2)',
      cpu_devices=2))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '2 local / 2 global devices' in proc.stderr
  assert 'batch 16 on 2 devices' in proc.stderr
  assert 'step 3/3 (100%)' in proc.stderr
  steps = [r['step'] for r in metrics.read_metrics(str(workdir)) if 'train_loss' in r]
  assert steps == [1, 2, 3]
  assert (workdir / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3']


def test_train_py_reports_config_errors_without_a_traceback(tmp_path):
  proc = _run_train_py('--config=configs/quickstart.py', f'--workdir={tmp_path}/w',
                       '--config.total_steps=10')
  assert proc.returncode != 0
  assert 'warmup_steps 200 exceeds config.total_steps 10' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_cpu_devices_after_jax_started_changes_nothing():
  from vit_jax import parallel
  have = len(jax.devices('cpu'))
  assert parallel.use_cpu_devices(have) and parallel.use_cpu_devices(0)
  assert not parallel.use_cpu_devices(have + 1)  # Warns; JAX keeps its devices.
  assert len(jax.devices('cpu')) == have
  with pytest.raises(ValueError, match='cpu_devices must be >= 0'):
    parallel.use_cpu_devices(-1)
