"""Bad configs and inputs fail before the train step is built, saying what to change.

Each case runs `trainer.train_and_evaluate` with one bad value. Building the
train step fails the test, so every error below is raised before the (slow)
compile; the messages are matched on the part that tells the user what to do.
"""

import functools
import logging
import os
import re
import shutil
import subprocess
import sys

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import pytest

from configs import common
from vit_jax import checkpoint
from vit_jax import models
from vit_jax import refusals
from vit_jax import steps
from vit_jax import trainer
from vit_jax.tools import cli
from vit_jax.tools import evaluate
from vit_jax.tools import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ERRORS = (ValueError, FileNotFoundError)  # config_checks.ConfigError is a ValueError.


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


def _config(data_dir, overrides):
  config = common.get_config()
  config.model = models.model_section('ViT-test_4', num_layers=1)
  config.dataset = 'digits'
  config.input.data_dir = str(data_dir)
  config.input.image_size = 16
  config.input.channels = 1
  config.batch_size = 32
  config.eval.batch_size = 64
  config.total_steps = 8
  config.schedule.warmup_steps = 2
  config.metrics.write_plot = False
  config.lock()
  config.update(overrides)
  return config


def _npz_of(tmp_path, name, **model_overrides):
  """A released-layout .npz of ViT-test_4 with `model_overrides`, 10 classes."""
  model = models.create_model('ViT-test_4', 10, num_layers=1, **model_overrides)
  init = functools.partial(model.init, train=False)
  shapes = jax.eval_shape(init, jax.random.key(0),
                          jnp.zeros((1, 16, 16, 1)))['params']
  path = tmp_path / name
  checkpoint.save_npz(path, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                         shapes))
  return str(path)


def _unwritable(tmp_path):
  if os.geteuid() != 0:
    path = tmp_path / 'read_only'
    path.mkdir(mode=0o500)
    return str(path)
  if not os.path.isdir('/sys'):  # root ignores permissions; sysfs refuses files.
    pytest.skip('no directory that root cannot write to')
  return '/sys'


def _file(tmp_path):
  path = tmp_path / 'a_file'
  path.write_text('x')
  return str(path)


def _garbage(tmp_path):
  path = tmp_path / 'garbage.npz'
  path.write_bytes(b'not a checkpoint')
  return {'pretrained_path': str(path)}


def _pickled(tmp_path):
  path = tmp_path / 'pickled.npz'
  np.savez(path, **{'head/kernel': np.array([{'x': 1}], dtype=object)})
  return {'pretrained_path': str(path)}


# (overrides or tmp_path -> overrides, tmp_path -> workdir or None, message)
CASES = {
    # Values and types.
    'batch_size_zero': ({'batch_size': 0}, None,
                        'config.batch_size must be a positive integer, got 0'),
    'batch_size_bool': ({'batch_size': True}, None,
                        'config.batch_size must be a positive integer, got True'),
    'image_size_none': ({'input': {'image_size': None}}, None,
                        'config.input.image_size must be a positive integer, '
                        'got None'),
    'total_steps_negative': ({'total_steps': -5}, None,
                             'config.total_steps must be a positive integer'),
    'no_duration': ({'total_steps': None}, None,
                    'set config.total_steps or config.total_epochs'),
    'lr_zero': ({'schedule': {'base_lr': 0.0}}, None,
                'config.schedule.base_lr must be a positive'),
    'lr_nan': ({'schedule': {'base_lr': float('nan')}}, None,
               'config.schedule.base_lr must be a positive number, got nan'),
    'warmup_longer_than_run': ({'schedule': {'warmup_steps': 100}}, None,
                               'warmup_steps 100 exceeds config.total_steps 8'),
    'unknown_optimizer': ({'optim': {'name': 'lamb'}}, None,
                          r"config.optim.name 'lamb' not in \('sgd'"),
    'unknown_schedule': ({'schedule': {'name': 'step'}}, None,
                         r"config.schedule.name 'step' not in \('cosine'"),
    'label_smoothing_one': ({'train': {'label_smoothing': 1.0}}, None,
                            r'label_smoothing must be in \[0, 1\)'),
    'grad_clip_negative': ({'optim': {'grad_clip_norm': -1.0}}, None,
                           r'grad_clip_norm must be >= 0 \(0 disables\)'),
    'wd_mask_not_a_regex': ({'optim': {'wd_mask': '('}}, None,
                            'wd_mask .* is not a regex'),
    'unknown_nan_policy': ({'train': {'nan_policy': 'ignore'}}, None,
                           r"nan_policy 'ignore' not in \('stop', 'skip_step'\)"),
    'unknown_parallelism': ({'train': {'parallelism': 'pmap'}}, None,
                            r"parallelism 'pmap' not in \('jit', 'shard_map'\)"),
    'channels_two': ({'input': {'channels': 2}}, None,
                     'must be 1 \\(grayscale\\) or 3'),
    'negative_cpu_devices': ({'mesh': {'cpu_devices': -2}}, None,
                             'config.mesh.cpu_devices must be an integer >= 0, got -2'),
    'keep_no_checkpoints': ({'checkpoint': {'keep': 0}}, None,
                            'config.checkpoint.keep must be a positive integer'),
    'empty_eval_splits': ({'eval': {'splits': ' '}}, None, 'config.eval.splits is empty'),
    # Model.
    'unknown_model': ({'model': {'name': 'ViT-Q_16'}}, None,
                      "Unknown model 'ViT-Q_16'.*Valid names"),
    'patch_does_not_divide_image': (
        {'input': {'image_size': 18}}, None,
        'image size 18 is not divisible by the patch size 4x4'),
    'patch_does_not_divide_conv_stem_grid': (
        {'model': {'conv_stem': (8, 8, 8)}, 'input': {'image_size': 16}}, None,
        'image size 16 becomes a 2x2 grid after the 3-stage conv_stem'),
    'conv_stem_depth_zero': (
        {'model': {'conv_stem': (8,), 'conv_stem_depth': 0}}, None,
        'conv_stem_depth must be >= 1, got 0'),
    # Batch against devices (8 simulated) and accumulation.
    'batch_not_divisible_by_devices': (
        {'batch_size': 12}, None,
        'batch_size 12 is not divisible by the 8 devices.*multiple of 8'),
    'accum_does_not_divide_batch': (
        {'train': {'accum_steps': 3}}, None,
        'config.train.accum_steps 3 does not divide config.batch_size 32'),
    'micro_batch_not_divisible_by_devices': (
        {'train': {'accum_steps': 8}}, None,
        r'micro-batch 4 .* a multiple of 64'),
    'eval_batch_not_divisible_by_devices': (
        {'eval': {'batch_size': 20}}, None,
        'batch_size 20 is not divisible by the 8 devices'),
    # Data.
    'unknown_dataset': ({'dataset': 'no_such_dataset'}, None, 'no_such_dataset'),
    'missing_image_folder': ({'dataset': 'folder:/no/such/root'}, None,
                             '/no/such/root'),
    'missing_eval_split': ({'eval': {'splits': 'validation'}}, None,
                           r"'validation'.*test.*train"),
    'missing_train_split': ({'input': {'train_split': 'extra'}}, None, "'extra'"),
    'empty_eval_split': ({'eval': {'splits': 'test,test[:0]'}}, None,
                         r"config.eval.splits: split 'test\[:0\]' of 'digits' "
                         r'holds no examples \(the splits hold test: 500'),
    'empty_train_split': ({'input': {'train_split': 'train[90%:90%]'}}, None,
                          r"config.input.train_split: split 'train\[90%:90%\]'"
                          ' of .digits. holds no examples'),
    # Workdir.
    'workdir_parent_missing': ({}, lambda p: str(p / 'missing' / 'run'),
                               'parent directory .* does not exist'),
    'workdir_is_a_file': ({}, _file, 'exists and is not a directory'),
    'workdir_unwritable': ({}, _unwritable, 'is not writable .*pick a writable'),
    # Pre-trained checkpoint.
    'pretrained_missing': ({'pretrained_path': '/no/such/ViT-B_16.npz'}, None,
                           'pretrained_path /no/such/ViT-B_16.npz does not exist'),
    'pretrained_not_npz': (_garbage, None, 'is not an .npz checkpoint'),
    'pretrained_pickled': (_pickled, None, 'contains pickled objects, refused'),
    'pretrained_other_architecture': (
        lambda p: {'pretrained_path': _npz_of(p, 'wide.npz', hidden_size=48)},
        None,
        r'(?s)do not match the model.*encoderblock_0/MlpBlock_3/Dense_0/kernel: '
        r'checkpoint \(48, 64\) vs model \(32, 64\).*hidden size 48 vs 32'),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_input_is_reported_before_compiling(case, data_dir, tmp_path,
                                                monkeypatch):
  overrides, workdir, message = CASES[case]
  if callable(overrides):
    overrides = overrides(tmp_path)
  workdir = workdir(tmp_path) if workdir else str(tmp_path / 'w')

  def no_train_step(*args, **kwargs):
    raise AssertionError('the train step was built before the error was found')

  monkeypatch.setattr(steps, 'make_train_step', no_train_step)
  existed = os.path.exists(workdir)
  with pytest.raises(_ERRORS, match=message):
    trainer.train_and_evaluate(_config(data_dir, overrides), workdir)
  # A refused start leaves no workdir it made; one that existed stays.
  assert os.path.exists(workdir) == existed


def _parse_train_py_flags(*args):
  """train.py's --config flag, parsed in-process on its own FlagValues."""
  argv = ['train.py', f'--config={ROOT}/configs/quickstart.py', *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values,
                                   lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize('arg,message', [
    ('--config.batchsize=64', 'Did you mean "batch_size" instead of "batchsize"'),
    ('--config.schedule.bsae_lr=0.1',
     'Did you mean "base_lr" instead of "bsae_lr"'),
    ('--config.batch_size=sixty', 'config.batch_size=sixty: invalid literal for int'),
])
def test_command_line_rejects_unknown_keys_and_wrong_types(arg, message):
  # Unknown keys: the configs are locked ConfigDicts (configs/common.py).
  with pytest.raises((AttributeError, flags.Error), match=message):
    _parse_train_py_flags(arg)
  assert _parse_train_py_flags('--config.batch_size=64').batch_size == 64



# ------------------------------------------- the entry points' exit path

_QUICK = ('--config.total_steps=4', '--config.schedule.warmup_steps=1',
          '--config.eval_every=2', '--config.checkpoint_every=2')


def _train_py(tmp_path, *args, env=None):
  """(exit code, stderr) of `python train.py ARGS` on the tiny quickstart."""
  from tiny import quickstart_on_digits  # pylint: disable=g-import-not-at-top
  argv = [sys.executable, os.path.join(ROOT, 'train.py'),
          *quickstart_on_digits(tmp_path / 'tfds', *_QUICK), *args]
  done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu',
                                              **(env or {})))
  return done.returncode, done.stderr


def _assert_one_error_line(err, code, want_code, pattern):
  lines = [l for l in err.splitlines() if 'error:' in l]
  assert code == want_code, err[-2000:]
  assert len(lines) == 1 and re.search(pattern, lines[0]), err[-2000:]
  assert 'Traceback' not in err and 'flags:' not in err, err[-2000:]
  assert 'Compiled the train step' not in err


_BAD_CONFIG_SOURCE = 'def get_config():\n  return dict(a=)\n'


def _syntax_message(source: str) -> str:
  """What this Python's compiler says of the source (each release words it anew)."""
  try:
    compile(source, 'bad_config.py', 'exec')
  except SyntaxError as e:
    return e.msg
  raise AssertionError('the source compiles')


_EXIT_CASES = {
    # (args, exit code, message); a workdir that does not exist beforehand.
    'misspelt_key': (['--config.batch_sise=8'], 1,
                     r'^error: --config.batch_sise: no such config key; did '
                     r'you mean "batch_size"\?$'),
    'missing_config_file': (['--config=configs/nosuch.py'], 1,
                            r'--config=configs/nosuch.py: no such file'),
    'config_syntax_error': (['--config={syntax}'], 1,
                            r'config file .*bad_config.py, line 2: '
                            + re.escape(_syntax_message(_BAD_CONFIG_SOURCE))),
    'unknown_flag': (['--nosuchflag'], 2, "usage error: Unknown command line "
                     "flag 'nosuchflag'"),
    'extra_argument': (['extra'], 2, r"usage error: unexpected arguments: "
                       r"\['extra'\]"),
    'config_argument_refused': (['--config=configs/cifar.py:bad'], 1,
                                r'^error: --config=configs/cifar.py: ValueError: '
                                r".*got 'bad'$"),
    'unknown_dataset': (['--config.dataset=fashon_mnist'], 1,
                        r"unknown dataset 'fashon_mnist': not a TFDS .* Did "
                        r"you mean 'fashion_mnist'"),
}


@pytest.mark.parametrize('case', sorted(_EXIT_CASES))
def test_train_py_refuses_in_one_line(case, tmp_path):
  args, want_code, pattern = _EXIT_CASES[case]
  syntax = tmp_path / 'bad_config.py'
  syntax.write_text(_BAD_CONFIG_SOURCE)
  workdir = tmp_path / 'w'
  code, err = _train_py(tmp_path, f'--workdir={workdir}',
                        *[a.format(syntax=syntax) for a in args])
  _assert_one_error_line(err, code, want_code, pattern)
  assert not workdir.exists()  # No empty workdir left behind.


def test_empty_eval_split_refused_before_compiling_workdir_untouched(tmp_path):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('mine')
  code, err = _train_py(tmp_path, f'--workdir={workdir}',
                        '--config.eval.splits=test[:0]')
  _assert_one_error_line(err, code, 1, r"^error: config.eval.splits: split "
                         r"'test\[:0\]' of 'digits' holds no examples")
  assert sorted(os.listdir(workdir)) == ['notes.txt']


def test_verbose_brings_the_traceback_back(tmp_path):
  code, err = _train_py(tmp_path, f'--workdir={tmp_path}/w', '--verbose',
                        '--config=configs/nosuch.py')
  assert code == 1 and 'Traceback' in err and 'no such file' in err, err[-2000:]
  code, err = _train_py(tmp_path, f'--workdir={tmp_path}/w',
                        '--config=configs/nosuch.py',
                        env={refusals.VERBOSE_ENV: '1'})
  assert code == 1 and 'Traceback' in err, err[-2000:]


def test_export_to_a_missing_folder_names_the_folder(tiny_run, tmp_path):
  out = tmp_path / 'no' / 'such' / 'model.npz'
  code = cli.run(export.define_flags, export.main, [
      'export', f'--workdir={tiny_run.workdir}', f'--out={out}'])
  assert code == 1 and not out.parent.exists()


def test_evaluate_tool_refuses_an_empty_split(tiny_run, capsys):
  code = cli.run(evaluate.define_flags, evaluate.main, [
      'evaluate', f'--checkpoint={tiny_run.workdir}', '--split=test[:0]'])
  err = capsys.readouterr().err
  assert code == 1 and re.search(
      r"^error: config.eval.splits: split 'test\[:0\]' of 'digits' holds no "
      'examples', err), err


def test_resuming_with_another_total_steps_says_what_happens(tiny_run, tmp_path,
                                                             caplog):
  from tiny import tiny_config  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'w'
  shutil.copytree(tiny_run.workdir, workdir)
  config = tiny_config(tiny_run.data_dir, total_steps=10, eval_every=5,
                       checkpoint_every=5, log_every=5)  # Cadence may change.
  with caplog.at_level(logging.WARNING):
    trainer.train_and_evaluate(config, str(workdir))
  assert re.search(r'resuming at step 8 with total_steps 10; the checkpoint '
                   r'was written by a run of total_steps 8: the learning-rate '
                   r'schedule is recomputed for 10 steps .* steps 9..10 follow',
                   caplog.text), caplog.text
  assert max(int(s) for s in os.listdir(workdir / 'checkpoints')) == 10
