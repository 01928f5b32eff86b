"""Hugging Face ViT directories and timm state dicts: export, import, refusals.

The tests that run transformers or timm skip without them (the bench extra);
the rest check names, shapes and refusals with numpy and safetensors only.
"""

import importlib.util
import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from vit_jax import checkpoint
from vit_jax import models
from vit_jax.checkpoint import hf
from vit_jax.checkpoint import layouts
from vit_jax.checkpoint import load_pretrained
from vit_jax.tools import cli
from vit_jax.tools import export

POSEMB = layouts.POSEMB_KEY
ATTN = 'MultiHeadDotProductAttention_1'
SIZE, CLASSES = 16, 5  # ViT-test_4: hidden 32, 2 layers, 2 heads, mlp 64.
NAMES = ('cat', 'dog', 'fox', 'owl', 'yak')


def random_params(name='ViT-test_4', seed=0, **overrides):
  """A model and random non-zero params for it (head included), no tracing
  beyond the abstract init."""
  model = models.create_model(name, CLASSES, **overrides)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3))))['params']
  rng = np.random.default_rng(seed)
  return model, jax.tree.map(
      lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)


def write_hf(path, name='ViT-test_4', **overrides):
  model, params = random_params(name, **overrides)
  hf.save_hf_dir(path, params, model=model, image_size=SIZE, channels=3,
                 class_names=NAMES)
  return model, params


def images(n=3):
  return np.random.default_rng(1).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(
      np.float32)


# ---------------------------------------------------------------- without torch


def test_hf_dir_round_trip_is_exact_with_vit_config(tmp_path):
  out = tmp_path / 'hf'
  _, params = write_hf(out)
  assert sorted(p.name for p in out.iterdir()) == [
      'config.json', 'model.safetensors', 'preprocessor_config.json']
  flat = layouts.flatten_params(params)
  back = hf.read_hf_dir(out)
  assert set(back) == set(flat)
  for name, value in flat.items():
    assert back[name].dtype == np.float32
    np.testing.assert_array_equal(back[name], value, err_msg=name)
  weights = load_file(out / 'model.safetensors')
  np.testing.assert_array_equal(  # torch Linear: [out, in].
      weights['vit.encoder.layer.1.intermediate.dense.weight'],
      flat['Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel'].T)
  assert weights['vit.encoder.layer.0.attention.attention.query.weight'].shape == (32, 32)
  assert weights['vit.embeddings.patch_embeddings.projection.weight'].shape == (32, 3, 4, 4)
  config = json.loads((out / 'config.json').read_text())
  assert config['model_type'] == 'vit'
  assert config['architectures'] == ['ViTForImageClassification']
  assert {k: config[k] for k in (
      'hidden_size', 'num_hidden_layers', 'num_attention_heads',
      'intermediate_size', 'image_size', 'patch_size', 'num_channels')} == dict(
          hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
          intermediate_size=64, image_size=16, patch_size=4, num_channels=3)
  assert config['hidden_act'] == 'gelu_pytorch_tanh'  # nn.gelu's tanh form.
  assert config['layer_norm_eps'] == 1e-6 and config['qkv_bias'] is True
  assert config['id2label'] == {str(i): n for i, n in enumerate(NAMES)}
  assert config['label2id'] == {n: i for i, n in enumerate(NAMES)}
  pp = json.loads((out / 'preprocessor_config.json').read_text())
  assert pp['size'] == {'height': 16, 'width': 16} and pp['resample'] == 2
  assert pp['rescale_factor'] == 1 / 255
  assert pp['image_mean'] == pp['image_std'] == [0.5] * 3


@pytest.mark.parametrize('name, overrides, why', [
    ('ViT-test_4-gap', {}, "classifier 'gap'"),
    ('ViT-test_4', dict(classifier='map'), "classifier 'map'"),
    ('ViT-test_4', dict(representation_size=16), 'a pre_logits layer'),
    ('R-test+ViT-test', {}, 'a ResNet hybrid stem'),
    ('ViT-test_4', dict(conv_stem=(16,)), 'a conv stem'),
    ('Mixer-test_4', {}, 'MlpMixer is not a ViT'),
    ('GFNet-test', {}, "classifier 'gap'"),
    ('ViT-test_4', dict(attention_impl='favor'), "attention_impl 'favor'"),
    ('ViT-test_4', dict(tome_r=2), 'tome_r=2'),
    ('ViT-test_4', dict(num_heads=(1, 2), head_dim=16), 'per-block head counts'),
])
def test_models_hf_vit_cannot_compute_are_refused_with_why(name, overrides, why):
  model = models.create_model(name, CLASSES, **overrides)
  with pytest.raises(ValueError, match='cannot be written as a Hugging Face'
                     ) as e:
    hf.check_exportable(model)
  assert why in str(e.value)


def test_a_refused_export_writes_nothing_and_out_is_checked(tmp_path):
  model, params = random_params('ViT-test_4-gap')
  with pytest.raises(ValueError, match="classifier 'gap'"):
    hf.save_hf_dir(tmp_path / 'gap', params, model=model, image_size=SIZE,
                   channels=3, class_names=NAMES)
  assert list(tmp_path.iterdir()) == []
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'x').write_text('')
  with pytest.raises(ValueError, match=f'{tmp_path}/full exists and is not empty'):
    hf.check_out_dir(tmp_path / 'full')
  with pytest.raises(ValueError, match=f'folder {tmp_path}/no of --out'):
    hf.check_out_dir(tmp_path / 'no' / 'hf')
  (tmp_path / 'empty').mkdir()
  hf.check_out_dir(tmp_path / 'empty')  # An empty directory is fine.


def _edit_config(path, **changes):
  config = json.loads((path / 'config.json').read_text())
  config.update(changes)
  (path / 'config.json').write_text(json.dumps(config))


def _edit_weights(path, edit):
  weights = load_file(path / 'model.safetensors')
  edit(weights)
  save_file(weights, path / 'model.safetensors')


def test_read_hf_dir_refuses_other_models_and_bad_tensors(tmp_path):
  good = tmp_path / 'good'
  write_hf(good)
  cases = {
      'bert': (lambda p: _edit_config(p, model_type='bert'),
               "model_type 'bert'; only Hugging Face ViT"),
      'mim': (lambda p: _edit_config(
          p, architectures=['ViTForMaskedImageModeling']),
              "architectures \\['ViTForMaskedImageModeling'\\]"),
      'relu': (lambda p: _edit_config(p, hidden_act='relu'),
               "hidden_act 'relu'"),
      'nobias': (lambda p: _edit_config(p, qkv_bias=False), 'qkv_bias is false'),
      'size': (lambda p: _edit_config(p, hidden_size='32'),
               "hidden_size must be a positive integer, got '32'"),
      'json': (lambda p: (p / 'config.json').write_text('{not json'),
               'config.json is not JSON'),
      'layers': (lambda p: _edit_config(p, num_hidden_layers=3),
                 "missing \\['vit.encoder.layer.2.layernorm_before.weight'"),
      'shape': (lambda p: _edit_weights(p, lambda w: w.update({
          'vit.encoder.layer.1.output.dense.weight':
              w['vit.encoder.layer.1.output.dense.weight'].T})),
                'vit.encoder.layer.1.output.dense.weight has shape \\(64, 32\\), '
                'config.json gives \\(32, 64\\)'),
      'missing': (lambda p: _edit_weights(
          p, lambda w: w.pop('vit.layernorm.bias')),
                  "missing \\['vit.layernorm.bias'\\]"),
      'dtype': (lambda p: _edit_weights(p, lambda w: w.update({
          'vit.layernorm.bias': np.zeros(32, np.int32)})),
                "tensor 'vit.layernorm.bias' has dtype I32"),
      'extra': (lambda p: _edit_weights(p, lambda w: w.update({
          'vit.embeddings.mask_token': np.zeros((1, 1, 32), np.float32)})),
                "unexpected \\['vit.embeddings.mask_token'\\]"),
      'bin': (lambda p: (p / 'model.safetensors').rename(p / 'pytorch_model.bin'),
              'has no model.safetensors'),
  }
  for name, (edit, message) in cases.items():
    path = tmp_path / name
    path.mkdir()
    for f in good.iterdir():
      (path / f.name).write_bytes(f.read_bytes())
    edit(path)
    with pytest.raises(ValueError, match=message):
      hf.read_hf_dir(path)


def test_load_pretrained_from_an_hf_dir(tmp_path):
  _, params = write_hf(tmp_path / 'hf')
  model, init = random_params(seed=1)
  loaded, report = load_pretrained(str(tmp_path / 'hf'), init, keep_head=True)
  assert not report.reinitialised and not report.left_out
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, b)
  # A model of another depth: the names are listed before anything compiles.
  _, deeper = random_params(num_layers=3)
  with pytest.raises(ValueError, match='Missing from the checkpoint.*'
                     'encoderblock_2'):
    load_pretrained(str(tmp_path / 'hf'), deeper)
  # A plain directory is neither an HF export nor a workdir.
  (tmp_path / 'plain').mkdir()
  with pytest.raises(FileNotFoundError, match='without checkpoints/ or config.json'):
    load_pretrained(str(tmp_path / 'plain'), init)


def timm_names(flat):
  """Our released params under timm's VisionTransformer names and layouts."""
  sd = {'cls_token': flat['cls'], 'pos_embed': flat[POSEMB],
        'patch_embed.proj.weight': flat['embedding/kernel'].transpose(3, 2, 0, 1),
        'patch_embed.proj.bias': flat['embedding/bias'],
        'norm.weight': flat['Transformer/encoder_norm/scale'],
        'norm.bias': flat['Transformer/encoder_norm/bias'],
        'head.weight': flat['head/kernel'].T, 'head.bias': flat['head/bias']}
  for i in range(2):
    b, t = f'Transformer/encoderblock_{i}/', f'blocks.{i}.'
    qkv = [flat[f'{b}{ATTN}/{p}/kernel'] for p in ('query', 'key', 'value')]
    sd[t + 'attn.qkv.weight'] = np.concatenate([k.reshape(32, -1).T for k in qkv])
    sd[t + 'attn.qkv.bias'] = np.concatenate(
        [flat[f'{b}{ATTN}/{p}/bias'].reshape(-1) for p in ('query', 'key', 'value')])
    sd[t + 'attn.proj.weight'] = flat[f'{b}{ATTN}/out/kernel'].reshape(-1, 32).T
    sd[t + 'attn.proj.bias'] = flat[f'{b}{ATTN}/out/bias']
    for ln, norm in (('LayerNorm_0', 'norm1'), ('LayerNorm_2', 'norm2')):
      sd[f'{t}{norm}.weight'] = flat[f'{b}{ln}/scale']
      sd[f'{t}{norm}.bias'] = flat[f'{b}{ln}/bias']
    for dense, fc in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
      sd[f'{t}mlp.{fc}.weight'] = flat[f'{b}MlpBlock_3/{dense}/kernel'].T
      sd[f'{t}mlp.{fc}.bias'] = flat[f'{b}MlpBlock_3/{dense}/bias']
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def test_load_pretrained_from_timm_and_released_safetensors(tmp_path):
  _, params = random_params()
  flat = layouts.flatten_params(params)
  _, init = random_params(seed=1)
  timm_file, ours_file = tmp_path / 'timm.safetensors', tmp_path / 'ours.safetensors'
  save_file(timm_names(flat), timm_file)
  export.save_safetensors(str(ours_file), params)
  for path in (timm_file, ours_file):
    loaded, _ = load_pretrained(str(path), init, keep_head=True)
    got = layouts.flatten_params(loaded)
    assert set(got) == set(flat)
    for name in flat:
      np.testing.assert_array_equal(got[name], flat[name], err_msg=f'{path} {name}')


def test_timm_state_dicts_we_do_not_compute_are_refused(tmp_path):
  _, params = random_params()
  _, init = random_params(seed=1)
  base = timm_names(layouts.flatten_params(params))
  gap = {k: v for k, v in base.items() if not k.startswith('norm.')}
  gap.update({'fc_norm.weight': base['norm.weight'],
              'fc_norm.bias': base['norm.bias']})
  cases = {
      'fcnorm': (gap, 'fc_norm: timm.*normalises the pooled features'),
      'layerscale': (dict(base, **{'blocks.0.ls1.gamma': np.ones(32, np.float32)}),
                     r'LayerScale \(init_values\) \(blocks.0.ls1.gamma\)'),
      'shape': (dict(base, **{'blocks.1.mlp.fc2.weight': np.ones((32, 60), np.float32)}),
                r'blocks.1.mlp.fc2.weight has shape \(32, 60\)'),
      'missing': ({k: v for k, v in base.items() if k != 'blocks.1.attn.proj.bias'},
                  r"missing \['blocks.1.attn.proj.bias'\]"),
      'dtype': (dict(base, **{'norm.bias': np.zeros(32, np.int64)}),
                "tensor 'norm.bias' has dtype I64"),
      'other': ({'decoder.weight': np.ones(3, np.float32)},
                'neither our released layout .* nor a timm'),
  }
  for name, (tensors, message) in cases.items():
    path = tmp_path / f'{name}.safetensors'
    save_file(tensors, path)
    with pytest.raises(ValueError, match=message):
      load_pretrained(str(path), init)


def test_export_tool_writes_hf_from_a_checkpoint_and_refuses(tmp_path, capsys):
  _, params = random_params()
  npz = str(tmp_path / 'm.npz')
  checkpoint.save_npz(npz, params)
  names = tmp_path / 'names.txt'
  names.write_text('\n'.join(NAMES))
  run = lambda *a: cli.run(export.define_flags, export.main, ['export', *a])
  source = (f'--checkpoint={npz}', '--model=ViT-test_4', f'--image_size={SIZE}')
  assert run('--format=hf', *source, f'--class_names={names}',
             f'--out={tmp_path}/hf') == 0
  assert f'wrote {tmp_path}/hf: config.json, model.safetensors (40 tensors' in (
      capsys.readouterr().out)
  back = hf.read_hf_dir(tmp_path / 'hf')
  for name, value in layouts.flatten_params(params).items():
    np.testing.assert_array_equal(back[name], value)
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert config['id2label']['4'] == 'yak'
  # Existing output, a model HF cannot compute: exit 1, the reason, no files.
  assert run('--format=hf', *source, f'--out={tmp_path}/hf') == 1
  assert f'--out {tmp_path}/hf exists and is not empty' in capsys.readouterr().err
  assert run('--format=hf', *source, '--drop_pruned_heads',
             f'--out={tmp_path}/h2') == 1
  assert 'are for --format=npz' in capsys.readouterr().err
  _, pooled = random_params(representation_size=8)
  checkpoint.save_npz(npz, pooled)
  assert run('--format=hf', *source, f'--out={tmp_path}/pre') == 1
  assert 'a pre_logits layer (representation_size=8)' in capsys.readouterr().err
  assert not (tmp_path / 'pre').exists()


# ---------------------------------------------------------------- with torch


def import_torch_side(*names):
  """The modules, or the test skips. triton's native library crashes a
  process that loaded TensorFlow first (another test of this worker may
  have), and torch loads it when installed: hidden, as in tools/bench_timm."""
  if 'tensorflow' in sys.modules:
    sys.modules.setdefault('triton', None)
  return [pytest.importorskip(name) for name in names]


@pytest.mark.parametrize('posemb, gelu_approximate', [('learn', True),
                                                      ('sincos2d', False)])
def test_transformers_loads_the_export_and_gives_our_logits(
    tmp_path, posemb, gelu_approximate):
  torch, transformers = import_torch_side('torch', 'transformers')
  model, params = random_params(posemb=posemb, gelu_approximate=gelu_approximate)
  trained = types.SimpleNamespace(model=model, params=params, image_size=SIZE,
                                  channels=3, class_names=NAMES)
  export.export_hf(trained, str(tmp_path / 'hf'))
  theirs = transformers.ViTForImageClassification.from_pretrained(
      tmp_path / 'hf').eval()
  assert theirs.config.id2label[4] == 'yak'
  x = images()
  with torch.no_grad():
    logits = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()
  ours = np.asarray(model.apply({'params': params}, x))
  assert np.abs(ours).max() > 0.1  # Non-trivial logits.
  np.testing.assert_allclose(logits, ours, atol=1e-4, rtol=1e-4)
  # Its image processor maps uint8 to our [-1, 1] (x / 127.5 - 1, as
  # data.preprocess.to_model_range) at the model's size.
  processor = transformers.ViTImageProcessor.from_pretrained(tmp_path / 'hf')
  image = np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), np.uint8)
  pixels = processor(images=image, return_tensors='np')['pixel_values'][0]
  np.testing.assert_allclose(pixels.transpose(1, 2, 0), image / 127.5 - 1,
                             atol=1e-6)


def test_a_transformers_vit_model_dir_reads_with_its_pooler_as_pre_logits(
    tmp_path):
  _, transformers = import_torch_side('torch', 'transformers')
  config = transformers.ViTConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=64, image_size=SIZE, patch_size=4)
  vit = transformers.ViTModel(config)  # No `vit.` prefix; a pooler, no head.
  vit.save_pretrained(tmp_path / 'vit')
  flat = hf.read_hf_dir(tmp_path / 'vit')
  assert 'head/kernel' not in flat
  np.testing.assert_array_equal(
      flat['pre_logits/kernel'], vit.pooler.dense.weight.detach().numpy().T)
  np.testing.assert_array_equal(
      flat[f'Transformer/encoderblock_1/{ATTN}/key/kernel'],
      vit.layers[1].attention.k_proj.weight.detach().numpy().T.reshape(32, 2, 16))


@pytest.mark.parametrize('timm_options, ours', [
    ({}, {}),
    (dict(global_pool='avg', class_token=False, fc_norm=False),
     dict(classifier='gap')),
    (dict(no_embed_class=True), {}),  # pos_embed without the cls row.
])
def test_a_timm_state_dict_loads_with_timms_logits(tmp_path, timm_options, ours):
  torch, _ = import_torch_side('torch', 'timm')
  from safetensors.torch import save_file as torch_save_file  # pylint: disable=g-import-not-at-top
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  timm_vit = VisionTransformer(img_size=SIZE, patch_size=4, embed_dim=32,
                               depth=2, num_heads=2, mlp_ratio=2,
                               num_classes=CLASSES, **timm_options).eval()
  with torch.no_grad():
    for p in timm_vit.parameters():
      p.normal_(0, 0.3)
  path = str(tmp_path / 'timm.safetensors')
  torch_save_file({k: v.contiguous() for k, v in timm_vit.state_dict().items()},
                  path)
  x = images()
  with torch.no_grad():
    want = timm_vit(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  diffs = {}
  for approximate in (False, True):  # timm's nn.GELU is the exact (erf) form.
    model, init = random_params(gelu_approximate=approximate, seed=1, **ours)
    params, _ = load_pretrained(path, init, keep_head=True)
    diffs[approximate] = np.abs(
        np.asarray(model.apply({'params': params}, x)) - want).max()
  assert diffs[False] < 1e-5
  # Our default tanh GELU on timm's weights: close, not equal (measured
  # 8e-5 to 1.5e-4 on these logits of size ~1; docs/models.md).
  assert 1e-6 < diffs[True] < 1e-3


def test_export_tool_writes_hf_from_a_workdir(tiny_run, tmp_path, capsys):
  """The session's tiny digits run (1 channel); with transformers installed,
  also its logits there."""
  out = tmp_path / 'hf'
  assert cli.run(export.define_flags, export.main, [
      'export', '--format=hf', f'--workdir={tiny_run.workdir}',
      f'--out={out}']) == 0
  assert f'wrote {out}' in capsys.readouterr().out
  config = json.loads((out / 'config.json').read_text())
  assert config['num_channels'] == 1
  assert config['id2label'] == {str(d): str(d) for d in range(10)}
  params = layouts.flatten_params(checkpoint.load_params(tiny_run.workdir))
  back = hf.read_hf_dir(out)
  for name, value in params.items():
    np.testing.assert_array_equal(back[name], value)
  if not all(importlib.util.find_spec(m) for m in ('torch', 'transformers')):
    return
  torch, transformers = import_torch_side('torch', 'transformers')
  theirs = transformers.ViTForImageClassification.from_pretrained(out).eval()
  model = models.create_model('ViT-test_4', 10)
  x = np.random.default_rng(3).uniform(-1, 1, (2, SIZE, SIZE, 1)).astype(np.float32)
  with torch.no_grad():
    logits = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()
  ours = model.apply({'params': layouts.unflatten_params(params)}, x)
  np.testing.assert_allclose(logits, ours, atol=1e-4, rtol=1e-4)
