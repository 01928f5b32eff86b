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
from vit_jax.tools import bench_mixers
from vit_jax.tools import bench_mixers_report
from vit_jax.tools import bench_pipeline
from vit_jax.tools import bench_timm
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
  assert result['precision'] == 'float32'
  assert isinstance(result['xla_auto_flags'], list)
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
    (['--sweep=mixers', '--sweep_tokens=64,100,120'], '120 is not a square'),
    (['--sweep=mixers', '--sweep_sizes=230'], 'not divisible by the patch'),
    (['--sweep=mixers', '--sweep_mixers=softmax,mamba'], "['mamba'] not in"),
    (['--dtype=bfloat16'], '--dtype was replaced by --precision'),
    (['--compare=timm,pytorch'], "unknown peer(s) ['pytorch']"),
    (['--sweep=mixers', '--profile_dots'], '--profile_dots profiles one step'),
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


def test_mixed_precision_is_timed_and_recorded(tmp_path):
  result = _run(TINY + ['--mode=train', '--precision=mixed_bf16'], tmp_path)
  _assert_positive(result, FIELDS)
  assert result['precision'] == 'mixed_bf16'


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
  assert result['timm_precision'] == 'float32'


@pytest.mark.skipif(not HAS_TIMM, reason='needs requirements-bench.txt')
def test_compare_timm_eager_and_compiled_under_autocast(tmp_path):
  out = tmp_path / 'timm.json'
  subprocess.run([sys.executable, '-m', 'vit_jax.tools.benchmark', *TINY,
                  '--mode=infer', '--precision=mixed_bf16',
                  '--compare=timm,timm_compile', f'--json={out}'],
                 cwd=ROOT, check=True)
  result = json.loads(out.read_text())
  _assert_positive(result, FIELDS + (
      'timm_img_per_sec', 'ratio_vs_timm', 'timm_compile_img_per_sec',
      'timm_compile_step_ms', 'ratio_vs_timm_compile', 'timm_compile_s'))
  assert result['timm_precision'] == 'autocast_bf16'
  assert result['precision'] == 'mixed_bf16'


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
  # timm's ViT mixes tokens with exact softmax attention only.
  for name, match in (('AFNO-test_4', "no 'afno' token mixer"),
                      ('GFNet-test', "no 'global_filter' token mixer")):
    with pytest.raises(ValueError, match=match):
      bench_timm.timm_kwargs(benchmark.model_fields(name, 'float32'),
                             (32, 32, 3), 10)
  fields = benchmark.model_fields('ViT-test_4-gap', 'float32')
  fields.attention_impl = 'favor'
  with pytest.raises(ValueError, match=r'no FAVOR\+ attention'):
    bench_timm.timm_kwargs(fields, (32, 32, 3), 10)


def test_compare_timm_refuses_a_model_it_lacks_before_compiling(monkeypatch,
                                                                capsys):
  monkeypatch.setattr(bench_timm, 'check_installed', lambda: None)
  monkeypatch.setattr(benchmark, 'build_jax_step', lambda *a: pytest.fail(
      'compiled a model timm cannot mirror'))
  code = cli.run(benchmark.define_flags, benchmark.main,
                 ['benchmark', *TINY, '--model=GFNet-test', '--compare=timm'])
  assert code == 1
  assert "no 'global_filter' token mixer" in capsys.readouterr().err


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
  assert "ModuleNotFoundError: No module named 'tensorflow" in proc.stderr


# --------------------------------------------------------------------------------
# --sweep=mixers (vit_jax/tools/bench_mixers.py), on the registry's test models.
# --------------------------------------------------------------------------------
SWEEP = ['--sweep=mixers', '--sweep_family=test', '--sweep_repeats=1',
         '--sweep_steps=1']


@pytest.mark.slow
def test_mixer_sweep_end_to_end(tmp_path, capsys):
  # In this process: a fresh process per point (the default, covered below)
  # costs seconds of imports each. Softmax attention and the global filter
  # take both paths of a block (attention, Fourier); FAVOR+ and AFNO, whose
  # compiles are the slowest, run in the next test.
  out, plot = tmp_path / 'sweep.json', tmp_path / 'sweep.png'
  code = cli.run(benchmark.define_flags, benchmark.main, [
      'benchmark', *SWEEP, '--sweep_tokens=16,64', '--sweep_sizes=32',
      '--sweep_mixers=softmax,global_filter', '--sweep_in_process',
      f'--sweep_json={out}', f'--sweep_plot={plot}'])
  assert code == 0
  result = json.loads(out.read_text())
  points = result['points']
  mixers, modes = ('softmax', 'global_filter'), ('train', 'infer')
  expected = [('block', mixer, mode, tokens) for mixer in mixers
              for mode in modes for tokens in (16, 64)]
  expected += [('model', mixer, mode, 64)  # 32 px = 8x8 patches of 4 px.
               for mixer in mixers for mode in modes]
  assert sorted((p['kind'], p['mixer'], p['mode'], p['tokens'])
                for p in points) == sorted(expected)
  for p in points:
    assert p['ok'], p
    _assert_positive(p, ('img_per_sec', 'step_ms', 'peak_mb', 'params',
                         'compile_s'))
  params = {(p['kind'], p['mixer'], p['tokens']): p['params'] for p in points}
  # The global filter holds a weight per frequency: more tokens, more params.
  assert params['block', 'softmax', 16] == params['block', 'softmax', 64]
  assert (params['block', 'global_filter', 16] <
          params['block', 'global_filter', 64])
  assert params['model', 'softmax', 64] == 53_768  # ViT-test_4-gap, 1000 classes.
  for kind, compared in (('block', [16, 64]), ('model', [64])):
    row = result['crossings'][kind]['global_filter']
    for cell in row.values():
      assert cell['compared'] == compared
      assert cell['text'] in ('16', '64', 'none up to 64', '16 (slower at [64])')
  report = capsys.readouterr().out
  assert 'block: smallest token count faster than softmax' in report
  assert report.splitlines() == result['report']
  assert result['complete'] and result['backend'] == 'cpu'
  assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_mixer_sweep_records_a_failed_point_and_goes_on(monkeypatch, tmp_path):
  # Width 36 is not divisible by AFNO's 8 blocks: its points fail to build.
  _, family = bench_mixers.FAMILIES['test']
  monkeypatch.setitem(bench_mixers.FAMILIES, 'test', ((36, 64, 2), family))
  out = tmp_path / 'sweep.json'
  code = cli.run(benchmark.define_flags, benchmark.main, [
      'benchmark', *SWEEP, '--sweep_tokens=16', '--sweep_sizes=',
      '--sweep_mixers=afno,softmax,favor', '--sweep_in_process',
      f'--sweep_json={out}'])
  assert code == 0
  result = json.loads(out.read_text())
  ok = {(p['mixer'], p['mode']): p['ok'] for p in result['points']}
  assert ok == {(mixer, mode): mixer != 'afno' for mixer in
                ('softmax', 'favor', 'afno') for mode in ('train', 'infer')}
  for p in result['points']:
    if p['ok']:
      _assert_positive(p, ('img_per_sec', 'peak_mb', 'params'))
    else:
      assert 'not divisible by afno_num_blocks 8' in p['error']
  assert result['crossings']['block']['afno']['train']['text'] == 'not measured'
  assert result['crossings']['block']['favor']['infer']['compared'] == [16]
  assert result['crossings']['model'] == {}
  assert any(line.startswith('FAILED block afno') for line in result['report'])


def test_mixer_sweep_point_in_its_own_process():
  fv = _flags([*SWEEP, '--sweep_tokens=16', '--sweep_sizes=',
               '--sweep_mixers=global_filter'])
  train, infer = bench_mixers.make_points(fv)
  result = bench_mixers.run_point_subprocess(infer, timeout_s=240)
  assert result['ok'], result
  _assert_positive(result, ('img_per_sec', 'peak_mb', 'base_rss_mb', 'params'))
  assert result['memory'] == 'host peak RSS'
  assert result['base_rss_mb'] <= result['peak_mb'] == result['peak_rss_mb']
  assert (result['mixer'], result['tokens'], result['batch']) == (
      'global_filter', 16, 4)
  # A point that does not finish is a failed point, not a failed sweep.
  slow = bench_mixers.run_point_subprocess(train, timeout_s=0.01)
  assert not slow['ok'] and 'timed out' in slow['error']


def test_crossing_table():
  def point(mixer, tokens, speed, mode='train', ok=True):
    return dict(kind='block', mixer=mixer, mode=mode, tokens=tokens,
                img_per_sec=speed, ok=ok)
  points = [point('softmax', 64, 100), point('softmax', 256, 50),
            point('softmax', 1024, 10), point('favor', 64, 20),
            point('favor', 256, 60), point('favor', 1024, 5),
            point('afno', 64, 10), point('afno', 256, 40),
            point('afno', 1024, 0, ok=False),
            point('softmax', 64, 100, 'infer'), point('afno', 64, 200, 'infer')]
  table = bench_mixers_report.crossings(points, 'block')
  assert table['favor']['train'] == dict(
      faster_from=256, faster_at=[256], compared=[64, 256, 1024],
      text='256 (slower at [1024])')
  assert table['afno']['train']['text'] == 'none up to 256'  # 1024 failed.
  assert table['afno']['infer']['text'] == '64'
  assert table['favor']['infer']['text'] == 'not measured'
