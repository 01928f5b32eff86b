"""Tests for vit_jax.metrics: jsonl writer, progress line, step timer, plot."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from vit_jax import metrics


# ------------------------------------------------------------------ writer
def test_jsonl_lines_are_json_with_step_and_floats(tmp_path):
  with metrics.MetricsLogger(str(tmp_path)) as logger:
    logger.write(10, {'train_loss': jnp.float32(0.5), 'learning_rate': 1e-3,
                      'img_per_sec': np.float64(812.0)})
    logger.write(20, {'eval_test_top1': 0.25, 'eval_test_top5': 0.75,
                      'eval_test_loss': 2})
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  records = [json.loads(line) for line in lines]
  assert records[0] == {'step': 10, 'train_loss': 0.5, 'learning_rate': 1e-3,
                        'img_per_sec': 812.0}
  assert records[1]['eval_test_loss'] == 2.0
  for record in records:
    assert isinstance(record['step'], int)
    assert all(isinstance(v, float) for k, v in record.items() if k != 'step')
  assert os.listdir(tmp_path / 'tensorboard')  # Event file written.
  assert metrics.read_metrics(str(tmp_path)) == records


def test_lines_are_flushed_before_close(tmp_path):
  logger = metrics.MetricsLogger(str(tmp_path))
  logger.write(1, {'train_loss': 1.0})
  assert metrics.read_metrics(str(tmp_path)) == [{'step': 1, 'train_loss': 1.0}]
  logger.close()


def test_nan_and_inf_are_valid_json(tmp_path):
  with metrics.MetricsLogger(str(tmp_path)) as logger:
    logger.write(5, {'train_loss': float('nan'), 'grad_norm': float('inf'),
                     'learning_rate': 0.1})
  line = (tmp_path / 'metrics.jsonl').read_text().strip()
  assert 'NaN' not in line and 'Infinity' not in line
  record = json.loads(line, parse_constant=pytest.fail)  # Strict JSON.
  assert record['train_loss'] is None and record['grad_norm'] is None
  (read,) = metrics.read_metrics(str(tmp_path))
  assert math.isnan(read['train_loss']) and read['learning_rate'] == 0.1


def test_resume_drops_lines_after_checkpoint(tmp_path):
  with metrics.MetricsLogger(str(tmp_path)) as logger:
    for step in (100, 200, 300):
      logger.write(step, {'train_loss': 1.0 / step})
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 350, "train_lo')  # Torn line from a killed process.
  with metrics.MetricsLogger(str(tmp_path), resume_step=200) as logger:
    assert [r['step'] for r in metrics.read_metrics(str(tmp_path))] == [100, 200]
    logger.write(250, {'train_loss': 0.1})
  assert [r['step'] for r in metrics.read_metrics(str(tmp_path))] == [100, 200, 250]


def test_disabled_logger_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  with metrics.MetricsLogger(str(workdir), enabled=False, resume_step=0) as logger:
    logger.write(1, {'train_loss': 1.0})
    logger.truncate_after(0)
  assert not workdir.exists()
  assert metrics.read_metrics(str(workdir)) == []


# ------------------------------------------------------------------ progress
def test_format_progress():
  line = metrics.format_progress(
      1200, 5000, {'train_loss': 0.41234, 'learning_rate': 1e-3, 'img_per_sec': 812.4,
                   'mfu': 0.312, 'grad_norm': 1.5, 'steps_per_sec': 3.0},
      elapsed_s=88, steps_per_s=3800 / 280)
  assert line == ('step 1200/5000 (24%) | train_loss 0.4123 | lr 1.0e-03 | 812 img/s'
                  ' | mfu 31.2% | grad_norm 1.5 | ETA 4m40s | elapsed 1m28s')
  # No rate yet: falls back to the average so far; unknown without either.
  assert 'ETA 10s' in metrics.format_progress(50, 100, {}, 10.0, None)
  assert 'ETA ?' in metrics.format_progress(0, 100, {}, 0.0, None)
  assert metrics.format_duration(7500) == '2h05m'


# ------------------------------------------------------------------ throughput
def test_step_timer(monkeypatch):
  clock = iter([0.0, 10.0, 12.0, 30.0, 31.0])
  monkeypatch.setattr(metrics.time, 'perf_counter', lambda: next(clock))
  timer = metrics.StepTimer(64, flops_per_step=1e12, num_devices=2,
                            peak_flops_per_device=1e12)  # t=0
  assert timer.lap(1) == {}                     # t=10: no origin yet.
  timer.reset(1)                                # t=12: after compilation.
  rates = timer.lap(10)                         # t=30: 9 steps in 18 s.
  assert rates['steps_per_sec'] == pytest.approx(0.5)
  assert rates['img_per_sec'] == pytest.approx(32.0)
  assert rates['mfu'] == pytest.approx(0.25)    # 1e12 / 2 s / 2e12.
  assert timer.elapsed_s == 31.0


# ------------------------------------------------------------------ plot
def _assert_png(path):
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with Image.open(path) as image:
    image.verify()


def test_curves_plot(tmp_path):
  workdir = str(tmp_path)
  assert metrics.save_curves_plot(workdir) == os.path.join(workdir, 'curves.png')
  _assert_png(os.path.join(workdir, 'curves.png'))  # No data at all.
  with metrics.MetricsLogger(workdir) as logger:
    for step in range(1, 6):
      logger.write(step, {'train_loss': 1.0 / step})
    _assert_png(metrics.save_curves_plot(workdir))  # No eval points yet.
    logger.write(5, {'eval_test_top1': 0.5, 'eval_val_top1': float('nan')})
  _assert_png(metrics.save_curves_plot(workdir))
