"""The tools (predict, attention_map, export, evaluate) on a tiny digits workdir."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from tiny import tiny_config
from tiny import quickstart_on_digits
from vit_jax import checkpoint
from vit_jax import data
from vit_jax import metrics
from vit_jax import models
from vit_jax.checkpoint import layouts
from vit_jax.data import sources
from vit_jax.tools import attention_map
from vit_jax.tools import cli
from vit_jax.tools import evaluate
from vit_jax.tools import export
from vit_jax.tools import loading
from vit_jax.tools import predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tiny_run):
  return tiny_run.data_dir


@pytest.fixture(scope='module')
def workdir(tiny_run):
  """tests/tiny.py's tiny ViT after 8 steps on digits (the session's run)."""
  return tiny_run.workdir


@pytest.fixture(scope='module')
def images(tmp_path_factory, data_dir):
  """The first test digit as grayscale PNG (native 8x8 and 40x40), RGB JPEG and
  gray+alpha PNG, and a corrupt file."""
  root = tmp_path_factory.mktemp('images')
  source = sources.open_source(tiny_config(data_dir))
  first = source.decode(next(iter(source.records('test'))))['image']
  first_test = first.numpy()[..., 0]
  paths = {'native': root / 'native.png', 'gray': root / 'gray.png',
           'rgb': root / 'rgb.jpg', 'alpha': root / 'alpha.png'}
  Image.fromarray(first_test).save(paths['native'])
  Image.fromarray(first_test).resize((40, 40)).save(paths['gray'])
  Image.fromarray(np.stack([first_test] * 3, -1)).resize((30, 50)).save(paths['rgb'])
  Image.fromarray(first_test).convert('LA').save(paths['alpha'])
  bad = root / 'corrupt.png'
  bad.write_bytes(b'\x89PNG\r\n\x1a\n' + b'not really a png')
  paths['corrupt'] = bad
  return {k: str(v) for k, v in paths.items()}


def _run(tool, *args):
  return cli.run(tool.define_flags, tool.main, [tool.__name__, *args])


# ---------------------------------------------------------------- predict


def test_predict_prints_top5_names_and_probabilities(workdir, images, capsys):
  assert _run(predict, f'--workdir={workdir}', images['gray'], images['rgb'],
              images['alpha']) == 0
  out = capsys.readouterr().out.splitlines()
  assert [out[0], out[6], out[12]] == [images['gray'], images['rgb'],
                                       images['alpha']]
  for block in (out[1:6], out[7:12], out[13:18]):
    probs = [float(line.split()[0]) for line in block]
    names = [line.split()[1] for line in block]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert all(n in [str(d) for d in range(10)] for n in names)  # digits' names


def test_predict_preprocessing_is_the_eval_pipelines(workdir, images, data_dir):
  trained = loading.load_workdir(workdir)
  assert trained.class_names == tuple(str(d) for d in range(10))
  assert (trained.image_size, trained.channels) == (16, 1)
  mine = trained.preprocess(loading.read_image(images['native']))
  batch = next(data.eval_iterator(tiny_config(data_dir), 'test',
                                  local_batch_size=8))
  np.testing.assert_array_equal(mine, batch['image'][0])
  logits = trained.model.apply({'params': trained.params}, batch['image'][:1])
  np.testing.assert_allclose(
      predict.class_probabilities(trained, [images['native']])[0],
      jax.nn.softmax(logits[0]), rtol=1e-5, atol=1e-6)


def test_predict_bad_input_names_the_problem(workdir, images, tmp_path, capsys):
  assert _run(predict, f'--workdir={workdir}', images['gray'],
              images['corrupt']) == 1
  err = capsys.readouterr().err
  assert f'Cannot decode image {images["corrupt"]}' in err
  assert 'Traceback' not in err
  assert _run(predict, f'--workdir={tmp_path}/missing', images['gray']) == 1
  assert f'no checkpoints at {tmp_path}/missing/checkpoints' in capsys.readouterr().err
  assert _run(predict, f'--checkpoint={tmp_path}/missing.npz', '--model=ViT-test_4',
              '--image_size=16', images['gray']) == 1
  assert f'No checkpoint file at {tmp_path}/missing.npz' in capsys.readouterr().err
  assert _run(predict, f'--workdir={workdir}', f'{tmp_path}/none.png') == 1
  assert f'No image file at {tmp_path}/none.png' in capsys.readouterr().err
  assert _run(predict, f'--workdir={workdir}') == 1
  assert _run(predict, '--top_k=x') == 2


# ---------------------------------------------------------------- export


def test_export_writes_the_released_layout_exactly(workdir, images, tmp_path,
                                                   capsys):
  out, st = str(tmp_path / 'model.npz'), str(tmp_path / 'model.safetensors')
  assert _run(export, f'--workdir={workdir}', f'--out={out}',
              f'--safetensors={st}') == 0
  want = checkpoint.load_params(workdir)
  for got in (checkpoint.load_npz(out), _load_safetensors(st)):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(a, b)
  with np.load(out) as npz:  # The released names, e.g. encoderblock_{i}/MlpBlock_3.
    assert 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel' in npz.files
  # Readable by the tools that read released files: same probabilities.
  names = tmp_path / 'names.txt'
  names.write_text('\n'.join(f'digit {d}' for d in range(10)))
  capsys.readouterr()
  assert _run(predict, f'--checkpoint={out}', '--model=ViT-test_4',
              '--image_size=16', f'--class_names={names}', images['gray']) == 0
  from_file = capsys.readouterr().out
  assert _run(predict, f'--workdir={workdir}', images['gray']) == 0
  from_workdir = capsys.readouterr().out
  assert from_file.replace('digit ', '') == from_workdir
  # A file read with the wrong image size says which tensor does not fit.
  assert _run(predict, f'--checkpoint={out}', '--model=ViT-test_4',
              '--image_size=32', images['gray']) == 1
  assert 'pos_embedding: checkpoint (1, 17, 32) vs model (1, 65, 32)' in (
      capsys.readouterr().err)


def _load_safetensors(path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return layouts.unflatten_params(load_file(path))


def test_export_of_a_missing_workdir_fails(tmp_path, capsys):
  assert _run(export, f'--workdir={tmp_path}/nothing', f'--out={tmp_path}/m.npz') == 1
  assert 'no checkpoints at' in capsys.readouterr().err
  assert not (tmp_path / 'm.npz').exists()


# ---------------------------------------------------------------- evaluate


def test_evaluate_reproduces_the_training_eval(workdir):
  results = evaluate.evaluate_checkpoint(loading.saved_config(workdir), workdir)
  logged = [r for r in metrics.read_metrics(workdir) if 'eval_test_top1' in r][-1]
  for key in ('eval_test_top1', 'eval_test_top5', 'eval_test_count'):
    assert results[key] == logged[key]
  np.testing.assert_allclose(results['eval_test_loss'], logged['eval_test_loss'],
                             rtol=1e-6)


def test_evaluate_cli_with_config_overrides_and_npz(workdir, data_dir, tmp_path,
                                                    capsys):
  npz = str(tmp_path / 'model.npz')
  checkpoint.save_npz(npz, checkpoint.load_params(workdir))
  out = tmp_path / 'eval.json'
  args = quickstart_on_digits(
      data_dir, '--config.model.hidden_size=32', '--config.model.num_layers=2',
      '--config.model.num_heads=2', '--config.model.mlp_dim=64',
      '--config.eval.batch_size=96', '--split=train[:100],test')
  assert _run(evaluate, *args, f'--checkpoint={npz}', f'--json_out={out}') == 0
  report = json.loads(out.read_text())
  assert report['eval_train_100_count'] == 100 and report['eval_test_count'] == 500
  assert json.loads(capsys.readouterr().out) == report
  assert _run(evaluate, *args, f'--checkpoint={tmp_path}/missing.npz') == 1
  assert f'No checkpoint file at {tmp_path}/missing.npz' in capsys.readouterr().err
  assert _run(evaluate, *args[:-1], '--split=validation',
              f'--checkpoint={npz}') == 1
  assert "Split 'validation'" in capsys.readouterr().err


# ---------------------------------------------------------------- attention maps


def test_attention_map_png_of_the_workdir(workdir, images, tmp_path, capsys):
  out = tmp_path / 'map.png'
  assert _run(attention_map, f'--workdir={workdir}', f'--image={images["rgb"]}',
              f'--out={out}') == 0
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  with Image.open(out) as png:
    assert png.size[0] > 300 and png.size[1] > 300
  assert _run(attention_map, f'--workdir={workdir}', f'--image={images["corrupt"]}',
              f'--out={tmp_path}/x.png') == 1
  assert 'Cannot decode image' in capsys.readouterr().err


def test_sown_attention_is_the_softmax_and_leaves_logits_alone(workdir, images):
  trained = loading.load_workdir(workdir)
  att = attention_map.collect_attention(trained, loading.read_image(images['gray']))
  assert att.weights.shape == (2, 2, 17, 17)  # layers, heads, cls + 4x4 patches
  np.testing.assert_allclose(att.weights.sum(-1), 1.0, rtol=1e-5)
  logits = trained.model.apply({'params': trained.params}, att.image[None])
  np.testing.assert_allclose(att.probs, jax.nn.softmax(logits[0]), rtol=1e-5)


def test_attention_maps_of_favor_say_what_they_draw_and_fourier_is_refused(
    workdir, images):
  trained = loading.load_workdir(workdir)
  image = loading.read_image(images['gray'])
  exact = attention_map.collect_attention(trained, image)
  performer = dataclasses.replace(
      trained, model=trained.model.clone(attention_impl='favor'))
  drawn = attention_map.collect_attention(performer, image)
  assert 'exact softmax attention' in drawn.note and not exact.note
  np.testing.assert_array_equal(drawn.weights, exact.weights)
  gfnet = dataclasses.replace(trained, model=models.create_model('GFNet-test', 10))
  with pytest.raises(ValueError, match='global filter.*no attention weights'):
    attention_map.collect_attention(gfnet, image)


def _synthetic(weights, classifier, probe=None):
  return attention_map.Attention(
      weights=weights, probe=probe, classifier=classifier, grid=(2, 3),
      image=np.zeros((6, 6, 3), np.float32), probs=np.ones(2) / 2)


def test_head_maps_and_rollout_follow_the_definitions():
  rng = np.random.default_rng(0)
  weights = rng.random((2, 3, 7, 7)).astype(np.float32)
  weights /= weights.sum(-1, keepdims=True)
  weights[1, :, 0] = np.eye(7)[5]  # Layer 1: cls looks only at patch 4 (row 1, col 1).
  att = _synthetic(weights, 'token')
  maps = attention_map.head_maps(att)
  assert maps.shape == (2, 3, 2, 3) and maps[1, 2, 1, 1] == 1.0
  np.testing.assert_array_equal(maps[0, 1], weights[0, 1, 0, 1:].reshape(2, 3))
  a = [w.mean(0) * 0.5 + np.eye(7) * 0.5 for w in weights]  # rows sum to 1 already
  np.testing.assert_allclose(attention_map.rollout(weights), a[1] @ a[0], rtol=1e-6)
  np.testing.assert_allclose(attention_map.rollout_map(att),
                             (a[1] @ a[0])[0, 1:].reshape(2, 3), rtol=1e-6)
  # No cls token: mean attention received, and the mean rollout row.
  gap = _synthetic(weights[:, :, 1:, 1:] / weights[:, :, 1:, 1:].sum(-1, keepdims=True),
                   'gap')
  np.testing.assert_allclose(attention_map.head_maps(gap)[0, 0],
                             gap.weights[0, 0].mean(0).reshape(2, 3), rtol=1e-6)
  probe = np.tile(np.eye(6)[2], (3, 1))  # MAP probe reads patch 2 only.
  np.testing.assert_allclose(
      attention_map.rollout_map(_synthetic(gap.weights, 'map', probe)),
      attention_map.rollout(gap.weights)[2].reshape(2, 3), rtol=1e-6)


@pytest.mark.parametrize('classifier', ['gap', 'map'])
def test_attention_map_of_models_without_cls(classifier, images, tmp_path):
  model = models.create_model('ViT-test_4', 3, classifier=classifier,
                              attention_impl='fused')
  params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3)))['params']
  trained = loading.TrainedModel(
      model=model, params=params, class_names=('a', 'b', 'c'), image_size=16,
      channels=3, pp=tiny_config('unused').pp, source='init')
  att = attention_map.collect_attention(trained, loading.read_image(images['gray']))
  assert att.weights.shape == (2, 2, 16, 16) and att.num_prefix == 0
  assert (att.probe is not None) == (classifier == 'map')
  attention_map.render(att, str(tmp_path / 'm.png'), title=classifier)
  assert (tmp_path / 'm.png').stat().st_size > 0


def test_attention_map_refuses_mixer(images):
  model = models.create_model('Mixer-test_4', 3)
  trained = loading.TrainedModel(
      model=model, params={}, class_names=('a', 'b', 'c'), image_size=16,
      channels=3, pp=tiny_config('unused').pp, source='init')
  with pytest.raises(ValueError, match='MlpMixer has no attention layers'):
    attention_map.collect_attention(trained, loading.read_image(images['gray']))


# ---------------------------------------------------------------- as a command


def test_predict_as_a_command_on_one_device(workdir, images):
  """The real entry point, in a fresh process that sees 1 device (the run used 8)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(
      [sys.executable, '-m', 'vit_jax.tools.predict', f'--workdir={workdir}',
       images['gray']], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert lines[0] == images['gray'] and len(lines) == 6
  assert 'Traceback' not in proc.stderr
