"""vit_jax.tools.bench_dots: the dots of a compiled step, found, profiled and
timed alone (what each row claims, never how fast)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.tools import bench_dots
from vit_jax.tools import benchmark
from vit_jax.tools import cli
import test_benchmark_tool


def _compiled(fn, *shapes_dtypes):
  args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes_dtypes]
  return jax.jit(fn).lower(*args).compile()


def test_finds_every_dot_with_its_shapes_contraction_and_flops():
  def fn(x, w, q, k):
    dense = jax.lax.dot_general(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                                (((1,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
    attention = jnp.einsum('bhqd,bhkd->bhqk', q, k)
    return jnp.tanh(dense).sum() + attention.sum()

  compiled = _compiled(fn, ((24, 16), jnp.float32), ((16, 40), jnp.float32),
                       ((2, 3, 5, 8), jnp.float32), ((2, 3, 7, 8), jnp.float32))
  kinds, dots = bench_dots.parse_hlo(compiled.as_text())
  dense = next(d for d in dots.values() if d.lhs.shape == (24, 16))
  # bf16 where XLA runs the product in bf16 (YNNPACK); the suite's XLA flags
  # (conftest.py) turn that off and XLA upcasts the operands.
  assert dense.text() in ('bf16[24,16] x bf16[16,40] c[1][0] -> f32',
                          'f32[24,16] x f32[16,40] c[1][0] -> f32')
  assert dense.flops == 2 * 24 * 16 * 40
  batched = next(d for d in dots.values() if d.lhs_batch)
  assert (batched.lhs_batch, batched.rhs_batch) == ((0, 1), (0, 1))
  assert batched.flops == 2 * 2 * 3 * 5 * 7 * 8
  # Each op a profile can name maps to its dot: a dot, or the fusion running it.
  assert all(kinds[name] in ('dot', 'fusion') for name in dots)
  assert bench_dots.module_name(compiled.as_text()).startswith('jit_fn')


def test_a_transposed_operand_is_timed_in_its_own_layout():
  # [k, m] stored, contracted over its first axis: XLA keeps the layout.
  operand = bench_dots.Operand('f32', (6, 4), (0, 1))
  data, perm = bench_dots._physical(operand, np.random.default_rng(0))
  assert data.shape == (4, 6) and perm == (1, 0)
  assert operand.text() == 'f32[6,4]{0,1}'
  assert bench_dots.Operand('bf16', (6, 4), (1, 0)).text() == 'bf16[6,4]'
  dot = bench_dots.Dot(operand, bench_dots.Operand('f32', (4, 3), (1, 0)),
                       'f32', (1,), (0,), (), (), 'fwd test')
  assert bench_dots.time_alone(dot, min_seconds=0.0, repeats=1) > 0


def test_overlapping_ops_share_their_time():
  # a alone 0-2, a and b 2-4 (1 each), b alone 4-5; c has no length.
  shared = bench_dots._share_time([(0, 4, 'a'), (2, 5, 'b'), (3, 3, 'c')])
  assert shared == {'a': 3.0, 'b': 2.0, 'c': 0.0}


def test_unknown_dtype_and_non_hlo_text_are_named():
  with pytest.raises(ValueError, match="element type 'c64'"):
    bench_dots._numpy_dtype('c64')
  with pytest.raises(ValueError, match='not an HLO module text'):
    bench_dots.module_name('hello')


def test_benchmark_profiles_the_train_step(tmp_path, capsys):
  out = tmp_path / 'dots.json'
  code = cli.run(benchmark.define_flags, benchmark.main,
                 ['benchmark', *test_benchmark_tool.TINY, '--profile_dots',
                  f'--json={out}'])
  assert code == 0
  result = json.loads(out.read_text())
  report = result['profile_dots']
  rows = report['dots']
  labels = {row['label'] for row in rows}
  # The forward and both backward products of the encoder's Dense layers.
  assert any(l.startswith('fwd') and 'MlpBlock' in l for l in labels), labels
  assert any(l.startswith('bwd') and 'MlpBlock' in l for l in labels), labels
  for row in rows:
    assert row['flops'] > 0 and row['count'] >= 1, row
    assert row['in_step_ms'] > 0 and row['alone_ms'] > 0, row
  # Times and counts are one device's (8 here): its dots' FLOPs are at most its
  # share of the step's, and most of the tiny model's.
  dot_flops = sum(row['count'] * row['flops'] for row in rows)
  share = dot_flops / (result['flops_per_step'] / result['num_devices'])
  assert 0.5 < share <= 1.01, share
  assert report['dots_ms'] <= report['busy_ms']
  assert report['glue'] and all(ms >= 0 for _, ms in report['glue'])
  printed = capsys.readouterr().out
  assert printed.count(' -> f32  (') == len(rows)
