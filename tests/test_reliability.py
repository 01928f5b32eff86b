"""Preemption and resume: SIGKILL/SIGTERM anywhere, damaged checkpoints, NaNs.

The guarantee under test (docs/resume.md): a run killed at any
point and restarted with the same command ends with parameters bitwise equal to
an uninterrupted run on the same machine, and logs the same losses.

Subprocess runs use tests/train_with_faults.py, which is train.py plus one fault
chosen by an environment variable (the command line stays the same). They
share a persistent compilation cache, to save compile time: the restarted runs
load the executable the first run compiled, which also makes "the same
program" literal.
"""

import functools
import glob
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tiny import quickstart_on_digits
from tiny import tiny_config

from vit_jax import checkpoint
from vit_jax import data
from vit_jax import config_checks
from vit_jax import metrics
from vit_jax import models
from vit_jax import optim
from vit_jax import parallel
from vit_jax import sharding
from vit_jax import steps
from vit_jax import trainer
from vit_jax.checkpoint import orbax_state

import train_with_faults

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, 'tests', 'train_with_faults.py')
TOTAL = 16


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """digits, prepared once here so that concurrent subprocesses only read it."""
  path = tmp_path_factory.mktemp('tfds')
  data.get_dataset_info(_config(path))
  return path


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp('jax_cache')
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')
  env.pop('XLA_FLAGS', None)  # One device per process.
  env.pop(train_with_faults.ENV, None)
  return env


def _args(workdir, data_dir, *extra):
  """train.py flags of a 16-step run with dropout (so the rng matters)."""
  return quickstart_on_digits(
      data_dir, f'--workdir={workdir}', '--config.model.num_layers=1',
      '--config.model.hidden_size=32', '--config.model.mlp_dim=32',
      '--config.model.dropout_rate=0.1', f'--config.total_steps={TOTAL}',
      '--config.schedule.warmup_steps=2', '--config.log_every=1',
      '--config.batch_size=16', '--config.eval.batch_size=32',
      '--config.eval.splits=test[:32]', '--config.eval_every=1000',
      '--config.checkpoint_every=4', '--config.metrics.write_plot=False', *extra)


def _start(args, env, fault=None):
  """Starts the helper; its stderr goes to a file (pipes could fill and block)."""
  env = dict(env, **({train_with_faults.ENV: fault} if fault else {}))
  log = open(f'{_workdir_of(args)}.{len(glob.glob(_workdir_of(args) + ".*"))}.log',
             'w+')
  proc = subprocess.Popen([sys.executable, HELPER, *args], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=log)
  proc.log = log
  return proc


def _workdir_of(args):
  return next(a.split('=', 1)[1] for a in args if a.startswith('--workdir='))


def _finish(proc, timeout=300):
  proc.wait(timeout=timeout)
  proc.log.seek(0)
  return proc.returncode, proc.log.read()


def _run(args, env, fault=None):
  return _finish(_start(args, env, fault))


def _sigterm_when(proc, marker, timeout=300):
  """Sends SIGTERM once stderr shows `marker`; returns (returncode, stderr)."""
  deadline = time.time() + timeout
  while proc.poll() is None and time.time() < deadline:
    with open(proc.log.name) as f:
      if marker in f.read():
        proc.send_signal(signal.SIGTERM)
        break
    time.sleep(0.05)
  return _finish(proc, timeout)


def _steps(workdir):
  return sorted(int(p) for p in os.listdir(os.path.join(workdir, 'checkpoints'))
                if p.isdigit())


def _assert_same_run(workdir, reference):
  """Bitwise equal parameters and the same logged losses, one line per step."""
  want, got = checkpoint.load_params(reference), checkpoint.load_params(workdir)
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  losses = lambda w: [(r['step'], r['train_loss'], r['grad_norm'])
                      for r in metrics.read_metrics(str(w)) if 'train_loss' in r]
  assert losses(workdir) == losses(reference)
  assert [s for s, _, _ in losses(workdir)] == list(range(1, TOTAL + 1))


def _resumed_at(stderr):
  match = re.search(r'Resumed from \S+ at step (\d+)', stderr)
  return int(match.group(1)) if match else None


# ------------------------------------------------------------- SIGKILL, SIGTERM


def test_killed_anywhere_and_restarted_ends_bitwise_equal(data_dir, env, tmp_path):
  reference, workdir = tmp_path / 'reference', tmp_path / 'killed'
  ref_proc = _start(_args(reference, data_dir), env)
  # 1. Between checkpoints: step 6 done, checkpoint 4 on disk.
  code, err = _run(_args(workdir, data_dir), env, 'kill_between:6')
  assert code == -signal.SIGKILL, err[-2000:]
  assert _steps(workdir) == [4]
  assert _finish(ref_proc)[0] == 0
  # 2. In the middle of the asynchronous save of step 8.
  code, err = _run(_args(workdir, data_dir), env, 'kill_saving:8')
  assert code == -signal.SIGKILL, err[-2000:]
  assert _resumed_at(err) == 4
  # 3. Right after the checkpoint of step 12 is committed.
  code, err = _run(_args(workdir, data_dir), env, 'kill_saved:12')
  assert code == -signal.SIGKILL, err[-2000:]
  assert _resumed_at(err) in (4, 8)  # 8 if its save finished before the kill.
  assert 12 in _steps(workdir)
  # 4. SIGTERM while it resumes and compiles: one step, a save, exit 0.
  code, err = _sigterm_when(_start(_args(workdir, data_dir), env),
                            'Resumed from')
  assert code == 0, err[-2000:]
  assert 'Preempted: saved step 13 of 16' in err
  assert _steps(workdir)[-1] == 13
  assert not glob.glob(str(workdir / 'checkpoints' / '*tmp*'))
  # 5. The same command once more finishes the run.
  code, err = _run(_args(workdir, data_dir), env)
  assert code == 0, err[-2000:]
  assert _resumed_at(err) == 13
  _assert_same_run(workdir, reference)


def test_nan_stops_naming_the_step_and_keeps_the_good_checkpoint(
    data_dir, env, tmp_path):
  # Step 5 is NaN; the first check after it is at step 8 (log, eval, save).
  workdir = tmp_path / 'nan'
  code, err = _run(_args(workdir, data_dir, '--config.log_every=8'), env, 'nan:5')
  assert code == 1, err[-2000:]
  assert 'Non-finite loss or gradient norm at step 5' in err
  assert 'Traceback' not in err
  assert _steps(workdir) == [4]
  assert [r['step'] for r in metrics.read_metrics(str(workdir))] == []


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(
    data_dir, env, tmp_path):
  workdir, port = tmp_path / 'mp', _free_port()
  procs = [_start(_args(workdir, data_dir, '--config.total_steps=400',
                        '--config.log_every=10', '--config.checkpoint_every=1000',
                        f'--coordinator_address=127.0.0.1:{port}',
                        '--num_processes=2', f'--process_id={i}'), env)
           for i in range(2)]
  code1, err1 = _sigterm_when(procs[1], 'step 10/400')  # Only process 1.
  code0, err0 = _finish(procs[0])
  assert (code0, code1) == (0, 0), (err0[-2000:], err1[-2000:])
  stops = [re.search(r'Preempted: saved step (\d+)', e) for e in (err0, err1)]
  assert all(stops), (err0[-2000:], err1[-2000:])
  step = int(stops[0].group(1))
  assert int(stops[1].group(1)) == step < 400
  assert _steps(workdir) == [step]


# ---------------------------------------------------- in-process: damage, skip


def _config(data_dir, **overrides):
  """test_train's tiny config, one block, logging and saving every 4 steps."""
  values = dict(model={'num_layers': 1}, eval={'splits': 'test[:64]'},
                log_every=4, eval_every=8, checkpoint_every=4)
  values.update(overrides)
  return tiny_config(data_dir, **values)


@pytest.fixture(scope='module')
def finished(tiny_run):
  """The session's 8-step tiny_config run: checkpoints 4 and 8 (copy to damage)."""
  return pathlib.Path(tiny_run.workdir)


def _data_files(item_dir):
  """The array-data files of an Orbax item, largest first (not its metadata)."""
  files = glob.glob(f'{item_dir}/**/d/*', recursive=True)
  return sorted(files, key=os.path.getsize, reverse=True)


def _garble(item_dir):
  """Flips 8 bytes in the middle of every data file of an Orbax item."""
  for path in _data_files(item_dir):
    raw = bytearray(open(path, 'rb').read())
    for i in range(len(raw) // 2, min(len(raw), len(raw) // 2 + 8)):
      raw[i] ^= 0xFF
    open(path, 'wb').write(bytes(raw))


def _truncate(item_dir):
  for path in _data_files(item_dir):
    os.truncate(path, os.path.getsize(path) // 2)


def _damage(workdir, how, step=8):
  latest = workdir / 'checkpoints' / str(step)
  if how == 'garbled':
    _garble(latest / 'params')
  elif how == 'truncated':
    _truncate(latest / 'train')
  elif how == 'deleted':
    os.remove(latest / 'meta' / 'metadata')
  else:  # Valid arrays, not the saved ones: Orbax reads them; the digest differs.
    shutil.rmtree(latest / 'params')
    shutil.copytree(workdir / 'checkpoints' / '4' / 'params', latest / 'params')


def _restore_latest(config, workdir):
  """orbax_state.restore_latest with the trainer's target state (no compile)."""
  model = models.create_model(config.model, 10)
  tx, _ = optim.make_optimizer(config, config.total_steps)
  init = functools.partial(steps.create_train_state, model, tx,
                           (config.input.image_size,) * 2 + (config.input.channels,),
                           config.seed)
  mesh = parallel.make_mesh()
  abstract = jax.eval_shape(init)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, sharding.state_shardings(abstract, mesh))
  with orbax_state.make_manager(str(workdir)) as manager:
    state, _ = orbax_state.restore_latest(
        manager, abstract, workdir=str(workdir),
        check_meta=lambda meta: orbax_state.check_resume_meta(meta, config))
    return int(state.step), manager.all_steps()


def _assert_moved_aside(workdir, caplog, step=8):
  assert re.search(rf'damaged checkpoint \S+/checkpoints/{step}\b', caplog.text)
  moved = glob.glob(str(workdir / orbax_state.CORRUPT_DIR / f'{step}-*'))
  assert len(moved) == 1 and os.listdir(moved[0])  # Kept, out of the way.


@pytest.mark.parametrize('damage', ['garbled', 'truncated', 'deleted', 'replaced'])
def test_damaged_latest_checkpoint_is_moved_aside(finished, data_dir, tmp_path,
                                                  caplog, damage):
  workdir = tmp_path / 'work'
  shutil.copytree(finished, workdir)
  _damage(workdir, damage)
  with caplog.at_level(logging.WARNING):
    assert _restore_latest(tiny_config(data_dir), workdir) == (4, [4])
  _assert_moved_aside(workdir, caplog)
  if damage == 'replaced':
    assert 'the restored arrays differ from the saved ones' in caplog.text


def test_resume_past_a_damaged_checkpoint_ends_bitwise_equal(
    finished, data_dir, tmp_path, caplog):
  workdir = tmp_path / 'work'
  shutil.copytree(finished, workdir)
  _damage(workdir, 'replaced')  # Only the digest can tell.
  with caplog.at_level(logging.WARNING):
    trainer.train_and_evaluate(tiny_config(data_dir), str(workdir))
  _assert_moved_aside(workdir, caplog)
  assert _steps(workdir) == [4, 8]
  for a, b in zip(jax.tree.leaves(checkpoint.load_params(finished)),
                  jax.tree.leaves(checkpoint.load_params(workdir))):
    np.testing.assert_array_equal(a, b)


def test_no_intact_checkpoint_stops_and_moves_nothing(finished, data_dir, tmp_path):
  workdir = tmp_path / 'work'
  shutil.copytree(finished, workdir)
  for step in (4, 8):
    _garble(workdir / 'checkpoints' / str(step) / 'params')
  with pytest.raises(orbax_state.NoGoodCheckpointError, match='step 8: .*step 4: '):
    trainer.train_and_evaluate(tiny_config(data_dir), str(workdir))
  assert _steps(workdir) == [4, 8]
  assert not (workdir / orbax_state.CORRUPT_DIR).exists()


def test_changed_model_is_refused_not_taken_for_damage(finished, data_dir, tmp_path):
  workdir = tmp_path / 'work'
  shutil.copytree(finished, workdir)
  config = tiny_config(data_dir, model={'num_layers': 1})
  with pytest.raises(config_checks.ConfigError,
                     match=r'(?s)another model or optimizer .*encoderblock_1'):
    trainer.train_and_evaluate(config, str(workdir))
  assert _steps(workdir) == [4, 8]
  assert not (workdir / orbax_state.CORRUPT_DIR).exists()


def test_skip_step_leaves_the_state_unchanged_and_counts(data_dir, tmp_path,
                                                          monkeypatch):
  train_with_faults.install('nan:3', patch=monkeypatch.setattr)
  workdir = tmp_path / 'skip'
  trainer.train_and_evaluate(
      _config(data_dir, total_steps=5, log_every=1, checkpoint_every=1,
              eval_every=5, train={'nan_policy': 'skip_step'},
              checkpoint={'keep': 10}),
      str(workdir))
  skipped = [r['skipped_steps'] for r in metrics.read_metrics(str(workdir))
             if 'train_loss' in r]
  assert skipped == [0, 0, 1, 1, 1]
  params = {s: checkpoint.load_params(workdir, step=s) for s in (2, 3, 4)}
  for a, b, c in zip(*(jax.tree.leaves(params[s]) for s in (2, 3, 4))):
    np.testing.assert_array_equal(a, b)  # Step 3 was not applied.
    assert np.all(np.isfinite(c))
  assert not np.array_equal(params[3]['head']['kernel'],
                            params[4]['head']['kernel'])
