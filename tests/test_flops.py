"""Tests for vit_jax.flops: XLA and analytic FLOP counts, MFU, device peaks."""

import types

import jax
import jax.numpy as jnp
import pytest

from vit_jax import flops


def test_mfu_arithmetic():
  # 8 devices x 100 TFLOP/s peak, 400 TFLOP in 1 s -> 50%.
  assert flops.mfu(400e12, 1.0, 8, 100e12) == pytest.approx(0.5)
  assert flops.mfu(400e12, 2.0, 8, 100e12) == pytest.approx(0.25)
  with pytest.raises(ValueError):
    flops.mfu(1.0, 0.0, 1, 1.0)


@pytest.mark.parametrize('hidden, mlp, expected', [
    (192, 768, 2.51e9), (384, 1536, 9.20e9), (768, 3072, 35.1e9)])
def test_vit_forward_flops_match_design(hidden, mlp, expected):
  forward = flops.vit_forward_flops(hidden, 12, mlp, 197, 16, 3, 1000)
  assert forward == pytest.approx(expected, rel=0.01)


def test_cost_analysis_flops_of_matmul():
  m, k, n = 64, 128, 32
  lowered = jax.jit(jnp.matmul).lower(jnp.ones((m, k)), jnp.ones((k, n)))
  assert flops.step_flops(lowered) == pytest.approx(2 * m * n * k, rel=0.01)
  assert flops.step_flops(lowered.compile()) == pytest.approx(2 * m * n * k, rel=0.01)
  as_list = types.SimpleNamespace(cost_analysis=lambda: [{'flops': 6.0}])
  assert flops.step_flops(as_list) == 6.0
  assert flops.step_flops(types.SimpleNamespace(cost_analysis=lambda: None)) is None


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
    counts[scan] = flops.train_step_flops(lowered, model, shape, batch, accum_steps)
  assert counts[True] == pytest.approx(counts[False], rel=0.05)
  assert flops.step_flops(lowered) < 0.7 * counts[True]  # The raw count misses blocks.


def test_peak_flops():
  tpu = types.SimpleNamespace(platform='tpu', device_kind='TPU v5 lite')
  gpu = types.SimpleNamespace(platform='gpu', device_kind='NVIDIA A100-SXM4-80GB')
  odd = types.SimpleNamespace(platform='gpu', device_kind='Mystery 9000')
  assert flops.peak_flops_per_device(tpu) == 197e12
  assert flops.peak_flops_per_device(
      types.SimpleNamespace(platform='tpu', device_kind='TPU v5')) == 459e12
  assert flops.peak_flops_per_device(gpu) == 312e12
  assert flops.peak_flops_per_device(odd) is None
  assert flops.peak_flops_per_device(odd, override=5e12) == 5e12
  cpu = flops.peak_flops_per_device(jax.devices('cpu')[0])
  assert 1e8 < cpu < 1e14
  assert flops.peak_flops_per_device(jax.devices('cpu')[0]) == cpu  # Cached.
