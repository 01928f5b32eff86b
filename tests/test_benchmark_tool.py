"""vit_jax.tools.benchmark on tiny shapes: every reported field, no timings.

The 8 simulated devices of conftest.py split each batch of 8 one per device.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from vit_jax import data
from vit_jax import flops
from vit_jax.tools import bench_pipeline
from vit_jax.tools import benchmark
from vit_jax.tools import cli
from tiny import quickstart_on_digits
from tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--model=ViT-test_4', '--image_size=16', '--channels=1',
        '--num_classes=10', '--batch=8', '--steps=1', '--repeats=2', '--warmup=1']
# What every run reports, each a finite positive number.
FIELDS = ('img_per_sec', 'step_ms', 'compile_s', 'peak_rss_mb', 'flops_per_step',
          'flops_per_sec', 'mfu', 'peak_flops_per_device', 'params')
HAS_TIMM = all(importlib.util.find_spec(m) for m in ('torch', 'timm'))


def _run(args, tmp_path, name='out.json'):
  out = tmp_path / name
  code = cli.run(benchmark.define_flags, benchmark.main,
                 ['benchmark', *args, f'--json={out}'])
  assert code == 0
  return json.loads(out.read_text())


def _assert_positive(result, fields):
  for field in fields:
    value = result[field]
    assert isinstance(value, (int, float)) and math.isfinite(value), (field, value)
    assert value > 0, (field, value)


@pytest.mark.parametrize('mode', ['train', 'infer'])
def test_reports_every_field(mode, tmp_path):
  result = _run(TINY + [f'--mode={mode}'], tmp_path)
  _assert_positive(result, FIELDS)
  assert (result['mode'], result['batch'], result['num_devices']) == (mode, 8, 8)
  assert len(result['img_per_sec_runs']) == 2
  assert result['params'] == 18_602  # ViT-test_4, 1 channel, 10 classes.
  # Training costs about 3x the forward pass; the tiny model's forward is
  # dominated by its matmuls, so the cost analysis lands near the analytic count.
  forward = 8 * flops.vit_forward_flops(
      32, 2, 64, 17, 4, 1, 10)
  ratio = result['flops_per_step'] / forward
  assert (2.5 < ratio < 4.5) if mode == 'train' else (0.9 < ratio < 1.6), ratio


def _flags(args):
  fv = benchmark.flags.FlagValues()
  argv = ['benchmark', *args]
  benchmark.define_flags(fv, argv)
  fv(argv)
  return fv


def test_quickstart_model_takes_its_config_shape():
  model, shape, classes = benchmark.resolve_shape(_flags(['--model=quickstart']))
  assert (model.name, model.hidden_size, shape, classes) == (
      'ViT-test_4', 64, (28, 28, 1), 10)
  # A flag on the command line still wins.
  _, shape, classes = benchmark.resolve_shape(
      _flags(['--model=quickstart', '--image_size=35', '--num_classes=3']))
  assert (shape, classes) == ((35, 35, 1), 3)
  _, shape, classes = benchmark.resolve_shape(_flags(['--model=ViT-S_16']))
  assert (shape, classes) == ((224, 224, 3), 1000)


@pytest.mark.parametrize('args, message', [
    (['--repeats=0'], '--repeats must be >= 1'),
    (['--model=ViT-X_16'], 'Unknown model'),
    (['--image_size=15'], 'not divisible by the patch size'),
    (['--pipeline', '--mode=infer'], 'drop --mode=infer'),
])
def test_bad_flags_fail_before_compiling(args, message, capsys):
  code = cli.run(benchmark.define_flags, benchmark.main,
                 ['benchmark', *TINY, *args])
  assert code == 1
  assert message in capsys.readouterr().err


def test_compare_without_timm_says_what_to_install(monkeypatch, capsys):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'timm' else real(name, *a))
  code = cli.run(benchmark.define_flags, benchmark.main,
                 ['benchmark', *TINY, '--compare=timm'])
  assert code == 1
  assert 'requirements-bench.txt' in capsys.readouterr().err


@pytest.mark.skipif(not HAS_TIMM, reason='needs requirements-bench.txt')
def test_compare_timm_on_the_same_shape(tmp_path):
  # A subprocess keeps torch out of the test worker.
  out = tmp_path / 'timm.json'
  subprocess.run([sys.executable, '-m', 'vit_jax.tools.benchmark', *TINY,
                  '--mode=train', '--compare=timm', f'--json={out}'],
                 cwd=ROOT, check=True)
  result = json.loads(out.read_text())
  _assert_positive(result, FIELDS + ('timm_img_per_sec', 'timm_step_ms',
                                     'ratio_vs_timm', 'torch_threads'))
  assert result['timm_params'] == result['params']  # The same model shape.
  assert 'patch_size=(4, 4), embed_dim=32, depth=2' in result['timm_model']
  assert len(result['ratio_vs_timm_runs']) == 2


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds_digits')
  data.get_dataset_info(tiny_config(path))  # Prepares it once.
  return path


def test_pipeline_mode(digits_dir, tmp_path):
  result = _run(quickstart_on_digits(
      digits_dir, '--config.input.prefetch=1', '--pipeline', '--model=ViT-test_4',
      '--batch=8', '--steps=1', '--repeats=2', '--warmup=1'), tmp_path)
  _assert_positive(result, FIELDS + ('pipeline_img_per_sec', 'pipeline_over_step'))
  assert (result['num_classes'], result['image_size'], result['channels']) == (
      10, 16, 1)  # digits' classes; the config's shape.
  assert result['pipeline_dataset'] == 'digits'
  assert len(result['pipeline_img_per_sec_runs']) == 2


def test_jpeg_folder_pipeline(tmp_path):
  config = tiny_config(tmp_path, input={'channels': 3})
  with bench_pipeline.jpeg_folder_config(config, 25) as folder_config:
    root = folder_config.dataset[len('folder:'):]
    train = os.path.join(root, 'train')
    assert sorted(os.listdir(train)) == [f'class_{i}' for i in range(10)]
    run, classes, facts = bench_pipeline.build_pipeline(folder_config, 8)
    assert run(1) >= 8  # Long enough to drain what tf.data buffered.
    assert classes == 10
    assert facts['pipeline_dataset'] == 'folder of 25 JPEGs'
    assert not facts['pipeline_cache']  # Decodes files every time.
  assert not os.path.exists(root)
  assert config.dataset == 'digits'  # The caller's config is untouched.


def test_timm_comparison_refuses_what_timm_cannot_mirror():
  # Checked before torch is imported: a conv stem or a ResNet stem is not a
  # plain ViT, and comparing with one would time a different model.
  from vit_jax.tools import bench_timm
  fields = benchmark.model_fields(_flags(['--model=quickstart']).config.model,
                                  'float32')
  with pytest.raises(ValueError, match=r'conv_stem \(16, 32, 64\)'):
    bench_timm.timm_kwargs(fields, (28, 28, 1), 10)
  fields.conv_stem = ()
  fields.patch_size = (7, 7)
  name, kwargs = bench_timm.timm_kwargs(fields, (28, 28, 1), 10)
  assert kwargs['embed_dim'] == 64 and kwargs['depth'] == 3
  with pytest.raises(ValueError, match='plain ViTs, not R-test'):
    bench_timm.timm_kwargs(benchmark.model_fields('R-test+ViT-test', 'float32'),
                           (32, 32, 3), 10)


def test_the_benchmark_runs_without_tensorflow_tfds_or_clu(tmp_path):
  """What a GPU machine without the input-pipeline libraries runs: models,
  steps, optimizer, sharding, flops and the benchmark (tests/tf_free.py makes
  importing tensorflow, tensorflow_datasets or clu fail)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  run = lambda *args: subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tests', 'tf_free.py'), *args],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  out = tmp_path / 'tf_free.json'
  proc = run('vit_jax.tools.benchmark', *TINY, '--config.mesh.cpu_devices=0',
             f'--json={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result['mode'] == 'train' and result['num_devices'] == 1
  _assert_positive(result, FIELDS)
  # The blocker is real: the input pipeline is what needs TensorFlow.
  proc = run('vit_jax.data.pipeline')
  assert proc.returncode != 0
  assert 'is not installed here (a TF-free run)' in proc.stderr
