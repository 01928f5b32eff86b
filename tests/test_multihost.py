"""A real multi-host run: 2 processes x 2 CPU devices of train.py on 127.0.0.1.

Checks, against a 1-process run on 4 devices of the same config:
  * the final params agree to float tolerance, although the 2-process run
    shards them (fsdp+model on a 2 x 2 mesh) and the reference replicates them;
  * each process fed only its half of every global batch, and the halves make
    up the reference's batch;
  * only process 0 wrote metrics.jsonl and TensorBoard events;
  * a 1-process run on 2 devices resumes the 2-process checkpoint (other
    process and device count, other sharding) and continues it.

Run as a script, this file is train.py that also records the labels and image
sums of every local training batch it reads (to $VIT_JAX_RECORD_BATCHES.<p>.jsonl):

    VIT_JAX_RECORD_BATCHES=/tmp/b python tests/test_multihost.py <train.py flags>
"""

import glob
import json
import os
import re
import runpy
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_ENV = 'VIT_JAX_RECORD_BATCHES'

pytestmark = pytest.mark.slow


def _record_batches(prefix: str) -> None:
  """Wraps vit_jax.data.train_iterator to log each local batch it yields."""
  from vit_jax import data  # pylint: disable=g-import-not-at-top
  make_iterator = data.train_iterator

  def train_iterator(config, *, local_batch_size, process_index=0,
                     process_count=1, start_step=0):
    batches = make_iterator(config, local_batch_size=local_batch_size,
                            process_index=process_index,
                            process_count=process_count, start_step=start_step)
    with open(f'{prefix}.{process_index}.jsonl', 'a') as f:
      for step, batch in enumerate(batches, start_step + 1):
        f.write(json.dumps({
            'step': step, 'process_count': process_count,
            'labels': batch['label'].tolist(),
            'image_sums': batch['image'].reshape(len(batch['image']), -1)
                          .sum(axis=1).round(3).tolist()}) + '\n')
        f.flush()
        yield batch

  data.train_iterator = train_iterator


if __name__ == '__main__':
  sys.argv[0] = os.path.join(ROOT, 'train.py')
  sys.path[0] = ROOT  # As for `python train.py`: the repo's packages first.
  if os.environ.get(RECORD_ENV):
    _record_batches(os.environ[RECORD_ENV])
  runpy.run_path(sys.argv[0], run_name='__main__')
  sys.exit(0)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

from vit_jax import checkpoint
from vit_jax import data
from vit_jax import metrics

from tiny import quickstart_on_digits
from tiny import tiny_config

STEPS = 4


def _flags(workdir, data_dir, *extra):
  """train.py flags: quickstart with tests/tiny.py's model (one block), 4 steps of 32."""
  return quickstart_on_digits(
      data_dir, f'--workdir={workdir}', '--config.model.hidden_size=32',
      '--config.model.num_heads=2', '--config.model.mlp_dim=64',
      '--config.model.num_layers=1', '--config.input.channels=1',
      '--config.pp.train_crop=resize', '--config.optim.name=adamw',
      '--config.schedule.base_lr=0.001', '--config.schedule.warmup_steps=2',
      '--config.batch_size=32', '--config.eval.batch_size=64',
      '--config.eval.splits=test[:64]', f'--config.total_steps={STEPS}',
      '--config.log_every=2', f'--config.eval_every={STEPS}',
      f'--config.checkpoint_every={STEPS}', '--config.metrics.write_plot=False',
      '--config.fewshot.datasets=digits', '--config.fewshot.shots=(2,5)',
      '--config.fewshot.seeds=2', '--config.fewshot.test_split=test[:100]',
      '--config.checkpoint.keep_best=1',
      '--config.checkpoint.best_metric=fewshot_digits_5shot', *extra)


def _start(args, devices, record=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  env.pop(RECORD_ENV, None)
  if record:
    env[RECORD_ENV] = record
  workdir = next(a.split('=', 1)[1] for a in args if a.startswith('--workdir='))
  log = open(f'{workdir}.{len(glob.glob(workdir + ".*.log"))}.log', 'w+')
  proc = subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=log)
  proc.log = log
  return proc


def _finish(proc, timeout=300, want_code=0):
  try:
    proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
  proc.log.seek(0)
  err = proc.log.read()
  assert proc.returncode == want_code, err[-3000:]
  return err


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _batches(prefix, process):
  with open(f'{prefix}.{process}.jsonl') as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """digits, prepared once here so that concurrent processes only read it."""
  path = tmp_path_factory.mktemp('tfds')
  data.get_dataset_info(tiny_config(path))
  return path


def test_two_processes_match_one_and_resume_in_one(data_dir, tmp_path):
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  port = _free_port()
  sharded = ('--config.sharding.rules=fsdp+model', '--config.mesh.model=2',
             '--config.sharding.fsdp_min_size=0')
  procs = [_start(_flags(multi, data_dir, *sharded,
                         f'--coordinator_address=127.0.0.1:{port}',
                         '--num_processes=2', f'--process_id={i}'),
                  devices=2, record=str(tmp_path / 'multi_batches'))
           for i in range(2)]
  reference = _start(_flags(single, data_dir), devices=4,
                     record=str(tmp_path / 'single_batches'))
  errs = [_finish(p) for p in procs]
  _finish(reference)
  assert 'JAX process 1/2, 2 local / 4 global devices' in errs[1]

  # Same params as one process on 4 devices, sharded or not.
  want, got = checkpoint.load_params(single), checkpoint.load_params(multi)
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)

  # The same few-shot probes (features gathered from both processes), and
  # the best checkpoint written by both.
  logged = [{k: v for r in metrics.read_metrics(d) for k, v in r.items()
             if k.startswith('fewshot_')} for d in (single, multi)]
  assert sorted(logged[0]) == ['fewshot_digits_2shot', 'fewshot_digits_5shot']
  for name, value in logged[0].items():
    assert abs(logged[1][name] - value) <= 0.011, (name, logged)  # 1 of 100.
  for a, b in zip(jax.tree.leaves(checkpoint.load_params(multi, 'best')),
                  jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)  # Step 4, the only evaluated one.

  # Each process read its own half of each global batch: rows [16p, 16p + 16).
  whole = _batches(tmp_path / 'single_batches', 0)
  halves = [_batches(tmp_path / 'multi_batches', p) for p in range(2)]
  assert [r['step'] for r in whole] == list(range(1, STEPS + 1))
  for step in range(STEPS):
    for key in ('labels', 'image_sums'):
      assert len(halves[0][step][key]) == len(halves[1][step][key]) == 16
      assert halves[0][step][key] + halves[1][step][key] == whole[step][key]

  # Only process 0 wrote metrics: one line per logged step, events of its pid.
  records = metrics.read_metrics(multi)
  assert [r['step'] for r in records if 'train_loss' in r] == [2, 4]
  assert [r['step'] for r in records if 'eval_test_64_top1' in r] == [STEPS]
  events = glob.glob(os.path.join(multi, metrics.TENSORBOARD_DIR, '*tfevents*'))
  assert events and all(f'.{procs[0].pid}.' in e for e in events), events

  # One process on 2 devices, replicated params, resumes and continues.
  err = _finish(_start(_flags(multi, data_dir, '--config.total_steps=6',
                              '--config.checkpoint_every=2'), devices=2))
  assert re.search(r'Resumed from \S+ at step 4', err), err[-3000:]
  records = metrics.read_metrics(multi)
  assert [r['step'] for r in records if 'train_loss' in r] == [2, 4, 6]
  assert [r['step'] for r in records if 'eval_test_64_top1' in r] == [4, 6]
  assert checkpoint.load_params(multi)['head']['kernel'].shape == (32, 10)
  assert not np.array_equal(checkpoint.load_params(multi, step=6)['head']['kernel'],
                            got['head']['kernel'])


def test_a_refusal_on_one_process_ends_every_process(data_dir, tmp_path):
  # Only process 1 is given an empty eval split (as if its data differed):
  # process 0 passes every check and must not wait for it in a collective.
  port = _free_port()
  procs = [_start(_flags(tmp_path / 'w', data_dir,
                         f'--coordinator_address=127.0.0.1:{port}',
                         '--num_processes=2', f'--process_id={i}',
                         *(['--config.eval.splits=test[:0]'] if i else [])),
                  devices=1) for i in range(2)]
  errs = [_finish(p, timeout=120, want_code=1) for p in procs]
  assert re.search(r"error: config.eval.splits: split 'test\[:0\]' of "
                   "'digits' holds no examples", errs[1]), errs[1][-3000:]
  assert re.search(r"error: process 1 refused the run: config.eval.splits: "
                   'split', errs[0]), errs[0][-3000:]
  assert not (tmp_path / 'w').exists() and 'Compiled' not in errs[0]
