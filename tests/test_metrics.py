"""Tests for vit_jax.metrics: jsonl writer, progress line, FLOPs/MFU, plot."""

import json
import math
import os
import types

import jax
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
def test_mfu_arithmetic():
  # 8 devices x 100 TFLOP/s peak, 400 TFLOP in 1 s -> 50%.
  assert metrics.mfu(400e12, 1.0, 8, 100e12) == pytest.approx(0.5)
  assert metrics.mfu(400e12, 2.0, 8, 100e12) == pytest.approx(0.25)
  with pytest.raises(ValueError):
    metrics.mfu(1.0, 0.0, 1, 1.0)


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


@pytest.mark.parametrize('hidden, mlp, expected', [
    (192, 768, 2.51e9), (384, 1536, 9.20e9), (768, 3072, 35.1e9)])
def test_vit_forward_flops_match_design(hidden, mlp, expected):
  flops = metrics.vit_forward_flops(hidden, 12, mlp, 197, 16, 3, 1000)
  assert flops == pytest.approx(expected, rel=0.01)


def test_cost_analysis_flops_of_matmul():
  m, k, n = 64, 128, 32
  lowered = jax.jit(jnp.matmul).lower(jnp.ones((m, k)), jnp.ones((k, n)))
  assert metrics.step_flops(lowered) == pytest.approx(2 * m * n * k, rel=0.01)
  assert metrics.step_flops(lowered.compile()) == pytest.approx(2 * m * n * k, rel=0.01)
  as_list = types.SimpleNamespace(cost_analysis=lambda: [{'flops': 6.0}])
  assert metrics.step_flops(as_list) == 6.0
  assert metrics.step_flops(types.SimpleNamespace(cost_analysis=lambda: None)) is None


@pytest.mark.parametrize('accum_steps', [1, 2])
def test_train_step_flops_count_every_scanned_block(accum_steps):
  # XLA counts a loop body once; the scanned model's corrected count must
  # match the unrolled model's plain count (to the non-matmul remainder).
  import optax
  from vit_jax import models, steps
  shape, batch = (16, 16, 3), 8
  data = {'image': jnp.zeros((batch,) + shape), 'label': jnp.zeros((batch,), jnp.int32)}
  counts = {}
  for scan in (False, True):
    model = models.create_model('ViT-test_4', 10, num_layers=4, scan_layers=scan)
    tx = optax.sgd(0.1)
    state = jax.eval_shape(lambda: steps.create_train_state(model, tx, shape, 0))
    step = steps.make_train_step(model, tx, num_classes=10, accum_steps=accum_steps)
    lowered = jax.jit(step).lower(state, data)
    counts[scan] = metrics.train_step_flops(lowered, model, shape, batch, accum_steps)
  assert counts[True] == pytest.approx(counts[False], rel=0.05)
  assert metrics.step_flops(lowered) < 0.7 * counts[True]  # The raw count misses blocks.


def test_peak_flops():
  tpu = types.SimpleNamespace(platform='tpu', device_kind='TPU v5 lite')
  gpu = types.SimpleNamespace(platform='gpu', device_kind='NVIDIA A100-SXM4-80GB')
  odd = types.SimpleNamespace(platform='gpu', device_kind='Mystery 9000')
  assert metrics.peak_flops_per_device(tpu) == 197e12
  assert metrics.peak_flops_per_device(
      types.SimpleNamespace(platform='tpu', device_kind='TPU v5')) == 459e12
  assert metrics.peak_flops_per_device(gpu) == 312e12
  assert metrics.peak_flops_per_device(odd) is None
  assert metrics.peak_flops_per_device(odd, override=5e12) == 5e12
  cpu = metrics.peak_flops_per_device(jax.devices('cpu')[0])
  assert 1e8 < cpu < 1e14
  assert metrics.peak_flops_per_device(jax.devices('cpu')[0]) == cpu  # Cached.


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
