"""vit_jax.tools.gpu_benchmark's dry run: every field of every row, the remat
fallback, and what happens without timm. No timings are checked.

The dry runs are subprocesses in which TensorFlow, TFDS and clu (and, for
one, torch and timm) are not installed, as on the GPU machine: each import
of them finds nothing (tests/tf_free.py, whose --hide_too hides torch and
timm as well).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from vit_jax.tools import cli
from vit_jax.tools import gpu_benchmark
from vit_jax.tools import gpu_benchmark_steps as steps_lib
from tf_free import BLOCKED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TIMM = all(importlib.util.find_spec(m) for m in ('torch', 'timm'))
TF_FREE = os.path.join(ROOT, 'tests', 'tf_free.py')
# Every row that ran reports these, each a finite number > 0.
OURS = ('img_per_sec', 'step_ms', 'mfu', 'flops_per_step', 'flops_per_sec',
        'peak_flops_per_device', 'compile_s', 'params', 'step_need_mb',
        'row_s')
TIMM = ('timm_img_per_sec', 'timm_step_ms', 'ratio_vs_timm', 'timm_params')
COLUMNS = ('model', 'attention', 'kernel', 'remat', 'img/s', 'step ms', 'MFU',
           'need GiB', 'peak GiB', 'timm img/s', 'timm ms', 'ours/timm', 'note')


def _dry_run(tmp_path, *args, hidden=BLOCKED):
  out = tmp_path / 'gpu.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # conftest's 8 devices: the tool times one.
  proc = subprocess.run(
      [sys.executable, TF_FREE, f'--hide_too={",".join(hidden)}',
       'vit_jax.tools.gpu_benchmark', '--dry_run', f'--json={out}', *args],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


def _assert_positive(row, fields):
  for field in fields:
    value = row[field]
    assert isinstance(value, (int, float)) and math.isfinite(value), (field, value)
    assert value > 0, (field, value)


def test_dry_run_reports_every_field_for_every_row(tmp_path):
  report, table = _dry_run(tmp_path)
  assert (report['dry_run'], report['backend'], report['precision']) == (
      True, 'cpu', 'bfloat16')
  assert (report['batch'], report['image_size'], report['repeats']) == (4, 16, 1)
  assert report['complete'] and report['memory_limit_source'] == 'none'
  rows = report['rows']
  assert [(r['model'], r['attention']) for r in rows] == [
      ('ViT-test_4', 'xla'), ('ViT-test_4', 'fused')]
  for row in rows:
    assert row['status'] == 'ok', row
    _assert_positive(row, OURS)
    assert row['remat'] == 'none'  # A CPU reports no limit: everything fits.
    assert [a['remat'] for a in row['remat_attempts']] == ['none']
    assert row['attention_kernel'] == 'xla'  # cuDNN is a GPU's.
    assert row['device_peak_mb'] is None  # Nor does a CPU count its peak.
    assert len(row['img_per_sec_runs']) == 1
    if HAS_TIMM:
      _assert_positive(row, TIMM)
      assert row['timm_params'] == row['params']  # The same model shape.
      assert (row['timm_device'], row['timm_remat'], row['timm_precision']) == (
          'cpu', 'none', 'autocast_bf16')
      assert row['timm_attention'] == 'sdpa'
      assert len(row['ratio_vs_timm_runs']) == 1
    else:
      assert not any(key.startswith(('timm_', 'ratio_vs_')) for key in row)
  assert report['timm'] == ('compared on cpu' if HAS_TIMM
                            else report['notes'][0])
  header, *body = table.splitlines()[1:4]
  assert header.split() == ' '.join(COLUMNS).split()
  for line, row in zip(body, rows):
    cells = line.split()
    assert cells[:4] == [row['model'], row['attention'], 'xla', 'none']
    assert ('-' not in cells[9:12]) == HAS_TIMM, line


def test_remat_fallback_and_no_timm(tmp_path):
  # 1 byte of memory: no policy's compiled step fits, so each is compiled in
  # turn and the last, 'full', runs anyway. torch and timm are not installed.
  report, table = _dry_run(tmp_path, '--memory_limit_bytes=1',
                           '--attention=xla',
                           hidden=BLOCKED + ('torch', 'timm'))
  (row,) = report['rows']
  assert row['status'] == 'ok', row
  assert row['remat'] == 'full'
  attempts = row['remat_attempts']
  assert [a['remat'] for a in attempts] == ['none', 'dots_saveable', 'full']
  for attempt in attempts:
    assert attempt['fits'] is False and attempt['need_bytes'] > 1, attempt
  assert 'over 90% of the memory limit even with remat full' in row['note']
  assert report['memory_limit_source'] == 'flag'
  assert not any(key.startswith(('timm_', 'ratio_vs_')) for key in row)
  assert report['timm'].startswith('timm comparison skipped: torch and timm '
                                   'do not import')
  assert f"note: {report['timm']}" in table


def _fake_build(needs, log, oom_at_run=(), oom_at_build=()):
  """build(policy) with a fixed need per policy; listed policies run out of
  memory when built or at their first step."""
  def build(policy):
    if policy in oom_at_build:
      raise RuntimeError('RESOURCE_EXHAUSTED: while compiling')

    def run(n):
      if policy in oom_at_run:
        raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying '
                           'to allocate 123 bytes.')
      log.append(policy)
      return n
    return steps_lib.Step(run, {}, needs[policy])
  return build


def test_first_that_fits():
  needs = {'none': 100, 'dots_saveable': 80, 'full': 50}
  policies = steps_lib.REMAT_FALLBACK
  log = []
  # 90% of 100 is 90: 'none' does not fit, 'dots_saveable' does.
  step, policy, attempts = steps_lib.first_that_fits(
      _fake_build(needs, log), policies, 100)
  assert policy == 'dots_saveable' and log == ['dots_saveable']
  assert attempts == [dict(remat='none', need_bytes=100, fits=False),
                      dict(remat='dots_saveable', need_bytes=80, fits=True)]
  # Out of memory at its first step, or while compiling: the next policy.
  _, policy, attempts = steps_lib.first_that_fits(
      _fake_build(needs, [], oom_at_run=('dots_saveable',),
                  oom_at_build=('none',)), policies, None)
  assert policy == 'full'
  assert [('error' in a, a.get('fits')) for a in attempts] == [
      (True, None), (True, True), (False, True)]
  assert attempts[1]['error'].startswith('RESOURCE_EXHAUSTED: Out of memory')
  with pytest.raises(MemoryError, match='out of memory with each of none, '
                     'dots_saveable, full'):
    steps_lib.first_that_fits(_fake_build(needs, [], oom_at_run=policies),
                              policies, None)
  # Anything else is a bug, not a reason to recompile.
  def broken(policy):
    raise TypeError(f'bad build {policy}')
  with pytest.raises(TypeError, match='bad build none'):
    steps_lib.first_that_fits(broken, policies, None)


@pytest.mark.parametrize('args, message', [
    (['--attention=xla,favor'], "['favor'] not in"),
    (['--batch=0'], '--batch must be >= 1'),
    (['--models=ViT-X_16'], 'Unknown model'),
    (['--image_size=18'], 'not divisible by the patch size'),
    (['--models=GFNet-test'], "no 'global_filter' token mixer"),
    (['--memory_limit_bytes=0'], '--memory_limit_bytes must be >= 1'),
])
def test_bad_flags_fail_before_compiling(args, message, capsys, monkeypatch):
  monkeypatch.setattr(gpu_benchmark, 'run_benchmark', lambda *a: pytest.fail(
      'ran with bad flags'))
  code = cli.run(gpu_benchmark.define_flags, gpu_benchmark.main,
                 ['gpu_benchmark', '--dry_run', *args])
  assert code == 1
  assert message in capsys.readouterr().err


def test_rows_past_the_time_budget_are_skipped_and_say_so(tmp_path):
  # The devices start before the first row: a millisecond is gone by then.
  report, table = _dry_run(tmp_path, '--time_budget_s=0.001', '--notimm')
  assert [r['status'] for r in report['rows']] == ['skipped', 'skipped']
  assert not report['complete']
  for row, line in zip(report['rows'], table.splitlines()[2:4]):
    assert row['note'].startswith('skipped: ') and 'budget' in row['note']
    assert line.endswith(row['note'])
    assert 'img_per_sec' not in row
