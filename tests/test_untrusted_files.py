"""Files from outside are data: each reader refuses a hostile or broken file
naming the file and the problem, before it is used (and before a bomb is
decoded or a pickle is run)."""

import io
import json
import logging
import re
import struct
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import common
from vit_jax import data
from vit_jax import models
from vit_jax.checkpoint import hf
from vit_jax.checkpoint import hf_config
from vit_jax.checkpoint import npz
from vit_jax.checkpoint import quantized
from vit_jax.checkpoint import safetensors_file
from vit_jax.config_checks import ConfigError
from vit_jax.data import folder
from vit_jax.data import pixel_limit
from vit_jax.tools import attention_map
from vit_jax.tools import cli
from vit_jax.tools import loading
from vit_jax.tools import predict

UNPICKLED = []


def _record_unpickling():
  UNPICKLED.append(True)
  return 'unpickled'


class _Payload:
  """Unpickling this runs `_record_unpickling`, as a hostile pickle runs code."""

  def __reduce__(self):
    return _record_unpickling, ()


def _png_header(path, width, height):
  """A PNG signature and IHDR claiming width x height, and no pixel data: a
  decoder fails on it, so only a header check can name its size."""
  ihdr = struct.pack('>II5B', width, height, 8, 0, 0, 0, 0)
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + struct.pack('>I', 13) + b'IHDR' + ihdr
                   + b'\0' * 4 + b'not image data')
  return path


def _run(tool, *args):
  return cli.run(tool.define_flags, tool.main, [tool.__name__, *args])


# ---------------------------------------------------------------- npz


def test_a_pickled_npz_is_refused_without_unpickling(tmp_path):
  path = tmp_path / 'hostile.npz'
  np.savez(path, kernel=np.ones(3, np.float32),
           payload=np.array([_Payload()], dtype=object))
  UNPICKLED.clear()
  for read in (npz.read_npz, npz.load_npz):
    with pytest.raises(ValueError) as e:
      read(path)
    assert f'{path} contains pickled objects, refused' in str(e.value)
    assert "'payload'" in str(e.value) and 'corrupt' not in str(e.value)
  assert not UNPICKLED


def test_a_pickled_int8_metadata_entry_is_refused(tmp_path):
  path = tmp_path / 'q.npz'
  np.savez(path, **{quantized.MARKER: np.array([_Payload()], dtype=object)})
  UNPICKLED.clear()
  with pytest.raises(ValueError, match='contains pickled objects, refused'):
    quantized.read_metadata(path)
  assert not UNPICKLED


def test_a_text_file_named_npz_says_what_it_is(tmp_path):
  path = tmp_path / 'model.npz'
  path.write_text('PK is how this text starts, but it is no zip archive')
  with pytest.raises(ValueError, match=f'{path} is not an .npz checkpoint'):
    npz.read_npz(path)


def test_npz_members_are_checked_from_their_headers(tmp_path):
  header = io.BytesIO()
  np.save(header, np.ones(4))
  lying = header.getvalue().replace(b"'shape': (4,)", b"'shape': (9,)")
  cases = {'lie': ('a.npy', lying, r"'a' claims shape \(9,\) float64 \(72 "
                   r'bytes\) but holds 32'),
           'text': ('notes.txt', b'hello', "'notes.txt', which is not a .npy")}
  for name, (member, content, message) in cases.items():
    path = tmp_path / f'{name}.npz'
    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr(member, content)
    with pytest.raises(ValueError, match=message):
      npz.read_npz(path)


def test_a_truncated_npz_is_still_called_corrupt(tmp_path):
  full = tmp_path / 'full.npz'
  np.savez(full, a=np.ones(1000))
  cut = tmp_path / 'cut.npz'
  cut.write_bytes(full.read_bytes()[:4000])
  with pytest.raises(ValueError, match=f'{cut} .*truncated or corrupt'):
    npz.read_npz(cut)
  assert set(npz.read_npz(full, names=('a', 'b'))) == {'a'}


# ---------------------------------------------------------------- pixel limit


@pytest.mark.parametrize('fmt,options', [
    ('PNG', {}), ('JPEG', {}), ('JPEG', {'progressive': True}), ('GIF', {}),
    ('BMP', {}), ('WEBP', {}), ('WEBP', {'lossless': True})])
def test_image_dimensions_come_from_the_header(tmp_path, fmt, options):
  path = tmp_path / f'image.{fmt.lower()}'
  Image.new('RGB', (37, 23), (9, 90, 200)).save(path, fmt, **options)
  assert pixel_limit.image_dimensions(path) == (37, 23)


def test_read_image_applies_a_configurable_limit(tmp_path):
  path = tmp_path / 'small.png'
  Image.new('L', (40, 30), 7).save(path)
  with pytest.raises(ValueError, match=r'is 40x30 \(0.0 megapixels\), over the '
                     r'limit of 0.0 megapixels \(--max_image_pixels; raise it'):
    loading.read_image(str(path), max_pixels=1199)
  assert loading.read_image(str(path), max_pixels=1200).shape == (30, 40, 1)


def test_a_header_that_lies_is_refused_before_decoding(tmp_path):
  path = _png_header(tmp_path / 'bomb.png', 20000, 20000)
  with pytest.raises(pixel_limit.ImageTooLarge, match=(
      rf'image {path} is 20000x20000 \(400.0 megapixels\), over the limit of '
      r'64.0 megapixels \(--max_image_pixels; raise it if the image is trusted\)')):
    loading.read_image(str(path))


def _folder(root, bomb_width=9000, bomb_height=8000):
  """train: two 6x5 images per class, and one header-only PNG claiming
  bomb_width x bomb_height in class b; test: one per class."""
  for split, count in (('train', 2), ('test', 1)):
    for name in ('a', 'b'):
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        Image.new('RGB', (6, 5), (i, 0, 0)).save(root / split / name / f'{i}.png')
  return _png_header(root / 'train' / 'b' / 'bomb.png', bomb_width, bomb_height)


def test_an_image_folder_refuses_an_image_over_the_limit(tmp_path):
  bomb = _folder(tmp_path)
  with pytest.raises(ValueError, match=(
      rf'image {bomb} is 9000x8000 \(72.0 megapixels\), over the limit of 64.0 '
      r'megapixels \(config.input.max_image_pixels; raise it')):
    folder.FolderSource(str(tmp_path), train_split='train', channels=3)
  with pytest.raises(ValueError, match=r'over the limit of 0.0 megapixels'):
    folder.FolderSource(str(tmp_path), train_split='test', channels=3,
                        max_image_pixels=29)


def test_an_image_folder_skips_an_image_over_the_limit(tmp_path, caplog):
  bomb = _folder(tmp_path)
  with caplog.at_level(logging.WARNING):
    source = folder.FolderSource(str(tmp_path), train_split='train', channels=3,
                                 skip_bad_images=True)
  assert source.split_size('train') == 4
  assert str(bomb) not in source.scan('train').paths
  assert f'image {bomb} is 9000x8000' in caplog.text
  assert 'skipping it' in caplog.text
  # A limit raised above it lets it through to the decode (which fails on a
  # header-only file: the limit was what stopped it before).
  with caplog.at_level(logging.WARNING):
    raised = folder.FolderSource(str(tmp_path), train_split='train',
                                 channels=3, skip_bad_images=True,
                                 max_image_pixels=72_000_000)
  assert raised.split_size('train') == 4
  assert f'Cannot decode image file {bomb}' in caplog.text


def test_a_real_bomb_in_a_folder_dataset_is_refused_by_default(tmp_path):
  _folder(tmp_path)
  (tmp_path / 'train' / 'b' / 'bomb.png').unlink()
  bomb = tmp_path / 'train' / 'a' / 'flat.png'
  Image.new('1', (9000, 8000), 1).save(bomb)  # 25 KB; 72 MB decoded.
  config = common.get_config()
  config.dataset = f'folder:{tmp_path}'
  config.input.image_size = 8
  with pytest.raises(ValueError, match=rf'image {bomb} is 9000x8000'):
    data.get_dataset_info(config)


@pytest.mark.parametrize('value', [0, -1, None])
def test_the_config_key_must_be_a_positive_int(value):
  config = common.get_config()
  config.input.max_image_pixels = value
  with pytest.raises(ConfigError, match='config.input.max_image_pixels must be '
                     'a positive integer'):
    data.check_config(config)


def test_a_saved_config_without_the_key_still_checks():
  config = common.get_config()
  del config.input['max_image_pixels']
  data.check_config(config)


def _random_params(model, image_shape):
  """Params of `model`'s shapes, random (numpy: no init to compile)."""
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *image_shape))))['params']
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda a: (rng.normal(size=a.shape) * 0.1).astype(a.dtype), abstract)


@pytest.fixture(scope='module')
def tiny_npz(tmp_path_factory):
  """An untrained ViT-test_4 at 16 px, 3 classes, as a released .npz."""
  params = _random_params(models.create_model('ViT-test_4', 3), (16, 16, 3))
  path = tmp_path_factory.mktemp('npz') / 'tiny.npz'
  npz.save_npz(path, params)
  return str(path)


def test_predict_refuses_an_image_over_the_limit(tiny_npz, tmp_path, capsys):
  bomb = _png_header(tmp_path / 'bomb.png', 9000, 8000)
  small = tmp_path / 'small.png'
  Image.new('RGB', (20, 20), (1, 2, 3)).save(small)
  model = [f'--checkpoint={tiny_npz}', '--model=ViT-test_4', '--image_size=16']
  assert _run(predict, *model, str(small), str(bomb)) == 1
  err = capsys.readouterr().err
  assert (f'image {bomb} is 9000x8000 (72.0 megapixels), over the limit of '
          '64.0 megapixels (--max_image_pixels; raise it') in err
  assert 'Traceback' not in err
  assert _run(predict, *model, '--max_image_pixels=399', str(small)) == 1
  assert 'over the limit of 0.0 megapixels' in capsys.readouterr().err
  assert _run(predict, *model, '--max_image_pixels=400', str(small)) == 0
  assert str(small) in capsys.readouterr().out


def test_attention_map_refuses_the_image_before_loading_a_model(tmp_path,
                                                                capsys):
  bomb = _png_header(tmp_path / 'bomb.png', 9000, 8000)
  assert _run(attention_map, f'--workdir={tmp_path}/no_such_run',
              f'--image={bomb}', f'--out={tmp_path}/map.png') == 1
  err = capsys.readouterr().err
  assert f'image {bomb} is 9000x8000' in err and 'no_such_run' not in err


# ---------------------------------------------------------------- safetensors


def _safetensors(path, header, data, header_length=None):
  text = json.dumps(header).encode()
  path.write_bytes(struct.pack('<Q', len(text) if header_length is None
                               else header_length) + text + data)
  return path


@pytest.mark.parametrize('case', ['header_past_the_end', 'shape_vs_bytes',
                                  'range_past_the_end', 'overlap', 'not_json'])
def test_a_bad_safetensors_header_is_refused(tmp_path, case):
  tensor = {'dtype': 'F32', 'shape': [2, 2], 'data_offsets': [0, 16]}
  header, data, length = {'w': tensor}, b'\0' * 16, None
  if case == 'header_past_the_end':
    length = 10_000
  elif case == 'shape_vs_bytes':
    header = {'w': dict(tensor, shape=[3, 3])}
  elif case == 'range_past_the_end':
    data = b'\0' * 8
  elif case == 'overlap':
    header = {'w': tensor, 'v': dict(tensor, shape=[2], data_offsets=[8, 16])}
  else:
    header = 'garbage'
  path = _safetensors(tmp_path / f'{case}.safetensors', header, data, length)
  with pytest.raises(ValueError, match=f'{path} could not be read as a '
                     'safetensors file'):
    safetensors_file.read_arrays(path)


def test_a_safetensors_integer_tensor_is_no_parameter(tmp_path):
  path = _safetensors(tmp_path / 'int.safetensors', {
      'w': {'dtype': 'I64', 'shape': [2], 'data_offsets': [0, 16]}}, b'\0' * 16)
  with pytest.raises(ValueError, match=f"{path}: tensor 'w' has dtype I64"):
    safetensors_file.read_arrays(path)


# ---------------------------------------------------------------- HF


_HF_CONFIG = dict(model_type='vit', hidden_size=8, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=16, image_size=8,
                  patch_size=4)


@pytest.mark.parametrize('text,message', [
    ('{"model_type": "vit", garbage', 'is not JSON'),
    ('[1, 2]', 'holds a list, not an object'),
    (json.dumps(dict(_HF_CONFIG, hidden_size=None)),
     'hidden_size must be a positive integer'),
    (json.dumps(dict(_HF_CONFIG, num_channels='3')),
     "num_channels must be a positive integer, got '3'"),
    (json.dumps(dict(_HF_CONFIG, hidden_act=['gelu'])), "hidden_act \\['gelu'\\]"),
    (json.dumps(dict(_HF_CONFIG, layer_norm_eps='1e-6')),
     'layer_norm_eps must be a number'),
    (json.dumps(dict(_HF_CONFIG, id2label=['cat', 'dog'])),
     'id2label must map class indices to names'),
])
def test_a_bad_hf_config_json_is_refused(tmp_path, text, message):
  (tmp_path / hf_config.CONFIG_FILE).write_text(text)
  file = re.escape(str(tmp_path / hf_config.CONFIG_FILE))
  with pytest.raises(ValueError, match=f'{file}:? .*{message}'):
    hf.read_hf_dir(tmp_path)


def test_an_hf_layer_count_past_the_file_builds_no_names_for_it(
    tmp_path, monkeypatch):
  (tmp_path / hf_config.CONFIG_FILE).write_text(
      json.dumps(dict(_HF_CONFIG, num_hidden_layers=10**9)))
  safetensors_file.write_arrays(tmp_path / hf.WEIGHTS_FILE, {
      'vit.encoder.layer.0.output.dense.bias': np.zeros(8, np.float32)})
  built = []

  def tensor_names(num_layers, **kw):
    built.append(num_layers)
    assert num_layers < 1000, 'names for every claimed layer'
    return names(num_layers, **kw)

  names = hf.tensor_names
  monkeypatch.setattr(hf, 'tensor_names', tensor_names)
  with pytest.raises(ValueError, match=r'does not hold the ViT of its '
                     r'config.json \(1000000000 layers\): missing'):
    hf.read_hf_dir(tmp_path)
  assert built == [2]


# ---------------------------------------------------------------- int8


@pytest.fixture(scope='module')
def int8_file(tmp_path_factory):
  """ViT-test_4 at 8 px, 3 classes, quantized (dynamic int8) and saved."""
  from vit_jax import quantization  # pylint: disable=g-import-not-at-top
  model = models.create_model('ViT-test_4', 3)
  shape = (8, 8, 3)
  params = _random_params(model, shape)
  qcfg = ml_collections.ConfigDict(common.get_config().quantization)
  _, qparams = quantization.quantize_params(model, params, qcfg, shape)
  meta = dict(quantization=qcfg.to_dict(),
              model=models.model_section('ViT-test_4').to_dict(),
              image_size=8, channels=3, class_names=['a', 'b', 'c'],
              pp=common.get_config().pp.to_dict(), source='test', config=None)
  path = tmp_path_factory.mktemp('int8') / 'q.npz'
  quantized.save(path, qparams, params, meta)
  return str(path)


def _rewrite(int8_file, path, name, change):
  arrays = npz.read_npz(int8_file)
  arrays[name] = change(arrays[name])
  np.savez(path, **arrays)
  return str(path)


KERNEL = 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'


def test_the_int8_file_loads(int8_file):
  trained = loading.load_quantized(int8_file)
  assert trained.class_names == ('a', 'b', 'c')


@pytest.mark.parametrize('name,change,message', [
    (KERNEL, lambda a: a.astype(np.float32),
     r'file float32 \(32, 64\) vs model int8'),
    (KERNEL, lambda a: np.ascontiguousarray(a.T),
     r'file int8 \(64, 32\) vs model int8 \(32, 64\)'),
    (KERNEL + '_scale', lambda a: a.astype(np.int8), 'file int8 .* vs model '
     'float32'),
    ('head/bias', lambda a: a.astype(np.float64), 'head/bias: file float64'),
])
def test_a_damaged_int8_file_is_refused(int8_file, tmp_path, name, change,
                                        message):
  bad = _rewrite(int8_file, tmp_path / 'bad.npz', name, change)
  with pytest.raises(ValueError, match=f'{re.escape(bad)} does not fit the '
                     f'int8 model(.|\n)*{message}'):
    loading.load_quantized(bad)
