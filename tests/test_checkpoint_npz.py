"""Tests for the released .npz format: layouts, atomic saves, posemb resize."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.checkpoint import load_npz
from vit_jax.checkpoint import load_pretrained
from vit_jax.checkpoint import save_npz
from vit_jax.checkpoint.layouts import flatten_params
from vit_jax.checkpoint.layouts import unflatten_params
from vit_jax.checkpoint.posemb import resize_posemb

POSEMB = 'Transformer/posembed_input/pos_embedding'
# Small ViT: hidden 32, 2 heads, mlp 64, 2 layers, patch 4 on 16 px (4x4 grid).
D, H, M, LAYERS, PATCH, GRID = 32, 2, 64, 2, 4, 4


def vit_flat(seed=0, *, cls=True, num_classes=10, pre_logits=False,
             hidden=D, layers=LAYERS, grid=GRID):
  """Random params in the released layout, as a flat {name: array} dict."""
  rng = np.random.default_rng(seed)
  shapes = {'embedding/kernel': (PATCH, PATCH, 3, hidden),
            'embedding/bias': (hidden,)}
  if cls:
    shapes['cls'] = (1, 1, hidden)
  shapes[POSEMB] = (1, grid * grid + int(cls), hidden)
  for i in range(layers):
    b = f'Transformer/encoderblock_{i}'
    for ln in ('LayerNorm_0', 'LayerNorm_2'):
      shapes[f'{b}/{ln}/scale'] = shapes[f'{b}/{ln}/bias'] = (hidden,)
    for proj in ('query', 'key', 'value'):
      shapes[f'{b}/MultiHeadDotProductAttention_1/{proj}/kernel'] = (
          hidden, H, hidden // H)
      shapes[f'{b}/MultiHeadDotProductAttention_1/{proj}/bias'] = (
          H, hidden // H)
    shapes[f'{b}/MultiHeadDotProductAttention_1/out/kernel'] = (
        H, hidden // H, hidden)
    shapes[f'{b}/MultiHeadDotProductAttention_1/out/bias'] = (hidden,)
    shapes[f'{b}/MlpBlock_3/Dense_0/kernel'] = (hidden, M)
    shapes[f'{b}/MlpBlock_3/Dense_0/bias'] = (M,)
    shapes[f'{b}/MlpBlock_3/Dense_1/kernel'] = (M, hidden)
    shapes[f'{b}/MlpBlock_3/Dense_1/bias'] = (hidden,)
  shapes['Transformer/encoder_norm/scale'] = (hidden,)
  shapes['Transformer/encoder_norm/bias'] = (hidden,)
  if pre_logits:
    shapes['pre_logits/kernel'] = (hidden, hidden)
    shapes['pre_logits/bias'] = (hidden,)
  if num_classes:
    shapes['head/kernel'] = (hidden, num_classes)
    shapes['head/bias'] = (num_classes,)
  flat = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  if cls:  # A cls row that big_vision files can represent (see below).
    flat[POSEMB][:, 0] = 0.0
  return flat


LINEN_NAMES = {
    'LayerNorm_2': 'LayerNorm_1',
    'MlpBlock_3': 'MlpBlock_0',
    'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
}


def to_linen(flat):
  out = {}
  for k, v in flat.items():
    parts = k.split('/')
    if k.startswith('Transformer/encoderblock_'):
      parts[2] = LINEN_NAMES.get(parts[2], parts[2])
    out['/'.join(parts)] = v
  return out


def to_big_vision(flat, *, scanned):
  flat = to_linen(flat)
  posemb = flat.pop(POSEMB)
  flat['pos_embedding'] = posemb[:, 1:] if 'cls' in flat else posemb
  if scanned:
    blocks = sorted({k.split('/')[1] for k in flat
                     if k.startswith('Transformer/encoderblock_')})
    leaves = {k.split('/', 2)[2] for k in flat
              if k.startswith('Transformer/encoderblock_')}
    for leaf in leaves:
      flat[f'Transformer/encoderblock/{leaf}'] = np.stack(
          [flat.pop(f'Transformer/{b}/{leaf}') for b in blocks])
  out = {f'params/{k}': v for k, v in flat.items()}
  out['opt/state/0/mu/embedding/kernel'] = np.ones(3, np.float32)
  return out


def write_raw(path, flat):
  with open(path, 'wb') as f:
    np.savez(f, **flat)


def assert_trees_equal(tree, flat):
  got = flatten_params(tree)
  assert sorted(got) == sorted(flat)
  for k in flat:
    assert got[k].dtype == flat[k].dtype, k
    np.testing.assert_array_equal(got[k], flat[k], err_msg=k)


# --------------------------------------------------------------- save / load


def test_save_load_roundtrip_is_exact(tmp_path):
  flat = vit_flat()
  tree = unflatten_params(flat)
  assert tree['Transformer']['encoderblock_1']['MlpBlock_3']['Dense_0'][
      'kernel'].shape == (D, M)
  save_npz(tmp_path / 'ckpt.npz', jax.tree.map(jnp.asarray, tree))
  assert_trees_equal(load_npz(tmp_path / 'ckpt.npz'), flat)


def test_saved_file_has_released_names(tmp_path):
  flat = vit_flat()
  save_npz(str(tmp_path / 'ckpt.npz'), unflatten_params(flat))
  with np.load(tmp_path / 'ckpt.npz', allow_pickle=False) as npz:
    keys = set(npz.files)
  assert keys == set(flat)
  assert {'cls', POSEMB, 'embedding/kernel', 'head/kernel',
          'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/bias',
          'Transformer/encoderblock_1/LayerNorm_2/scale',
          'Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias'} <= keys


def test_save_stores_bfloat16_as_float32(tmp_path):
  tree = {'head': {'kernel': jnp.ones((2, 3), jnp.bfloat16),
                   'bias': np.zeros(3, np.float32)}}
  save_npz(tmp_path / 'c.npz', tree)
  loaded = load_npz(tmp_path / 'c.npz')
  assert loaded['head']['kernel'].dtype == np.float32
  np.testing.assert_array_equal(loaded['head']['kernel'], np.ones((2, 3)))


def test_load_linen_layout(tmp_path):
  flat = vit_flat()
  write_raw(tmp_path / 'linen.npz', to_linen(flat))
  assert_trees_equal(load_npz(tmp_path / 'linen.npz'), flat)


@pytest.mark.parametrize('scanned', [False, True])
@pytest.mark.parametrize('cls', [True, False])
def test_load_big_vision_layout(tmp_path, scanned, cls):
  flat = vit_flat(cls=cls)
  raw = to_big_vision(flat, scanned=scanned)
  assert raw['params/pos_embedding'].shape == (1, GRID * GRID, D)
  write_raw(tmp_path / 'bv.npz', raw)
  loaded = load_npz(tmp_path / 'bv.npz')
  assert_trees_equal(loaded, flat)  # Also: the opt/ entry is ignored.
  posemb = loaded['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, GRID * GRID + int(cls), D)
  if cls:
    np.testing.assert_array_equal(posemb[:, 0], 0.0)


def test_load_rejects_mixed_block_names(tmp_path):
  flat = vit_flat()
  mixed = to_linen(flat)
  mixed['Transformer/encoderblock_1/LayerNorm_2/scale'] = mixed.pop(
      'Transformer/encoderblock_1/LayerNorm_1/scale')
  write_raw(tmp_path / 'mixed.npz', mixed)
  with pytest.raises(ValueError, match='mix Linen and released'):
    load_npz(tmp_path / 'mixed.npz')


@pytest.mark.parametrize('content,reason', [
    (b'not a checkpoint at all', 'zip signature'),
    (b'', 'empty'),
    (b'PK\x03\x04' + b'\x00' * 40, 'truncated or corrupt'),
])
def test_load_non_npz_raises_and_leaves_file(tmp_path, content, reason):
  path = tmp_path / 'bad.npz'
  path.write_bytes(content)
  with pytest.raises(ValueError, match=reason) as err:
    load_npz(path)
  assert str(path) in str(err.value)
  assert path.read_bytes() == content


def test_load_truncated_npz(tmp_path):
  path = tmp_path / 'cut.npz'
  save_npz(path, unflatten_params(vit_flat()))
  path.write_bytes(path.read_bytes()[:5000])
  with pytest.raises(ValueError, match=re.escape(str(path))):
    load_npz(path)


def test_load_npy_file_is_named(tmp_path):
  path = tmp_path / 'array.npz'
  with open(path, 'wb') as f:
    np.save(f, np.zeros(3))
  with pytest.raises(ValueError, match='single .npy array'):
    load_npz(path)


def test_load_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.npz'):
    load_npz(tmp_path / 'nope.npz')


def test_save_failure_keeps_old_file(tmp_path, monkeypatch):
  path = tmp_path / 'ckpt.npz'
  old = vit_flat(seed=1)
  save_npz(path, unflatten_params(old))
  old_bytes = path.read_bytes()

  def failing_savez(f, **arrays):
    f.write(b'PK\x03\x04 half an archive')
    raise OSError('disk full')

  monkeypatch.setattr(np, 'savez', failing_savez)
  with pytest.raises(OSError, match='disk full'):
    save_npz(path, unflatten_params(vit_flat(seed=2)))
  monkeypatch.undo()
  assert path.read_bytes() == old_bytes
  assert os.listdir(tmp_path) == ['ckpt.npz']  # Temp file cleaned up.
  assert_trees_equal(load_npz(path), old)


def test_save_overwrites_existing_file(tmp_path):
  path = tmp_path / 'ckpt.npz'
  save_npz(path, unflatten_params(vit_flat(seed=1)))
  new = vit_flat(seed=2)
  save_npz(path, unflatten_params(new))
  assert_trees_equal(load_npz(path), new)
  assert os.listdir(tmp_path) == ['ckpt.npz']


# --------------------------------------------------------------- posemb resize


def test_resize_same_size_is_identity():
  posemb = np.random.default_rng(0).normal(size=(1, 17, 8)).astype(np.float32)
  for method in ('linear', 'bicubic'):
    out = resize_posemb(posemb, 17, num_prefix_tokens=1, method=method)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, posemb)


def test_resize_linear_known_values():
  grid = np.array([[0., 1.], [2., 3.]])
  posemb = np.concatenate([np.full((1, 1, 2), 7.0),
                           np.stack([grid, -grid], -1).reshape(1, 4, 2)], 1)
  out = resize_posemb(posemb.astype(np.float32), 10, num_prefix_tokens=1)
  assert out.shape == (1, 10, 2)
  np.testing.assert_array_equal(out[0, 0], [7.0, 7.0])  # cls row kept.
  new = out[0, 1:, 0].reshape(3, 3)
  # Corner to corner: corners stay, midpoints are averages.
  np.testing.assert_allclose(new, [[0, .5, 1], [1, 1.5, 2], [2, 2.5, 3]],
                             atol=1e-6)
  np.testing.assert_allclose(out[0, 1:, 1], -out[0, 1:, 0], atol=1e-6)


def test_resize_non_square_grids():
  old = np.arange(6.0).reshape(2, 3)  # Value = 3 * row + col.
  posemb = old.reshape(1, 6, 1)
  out = resize_posemb(posemb, (3, 5), num_prefix_tokens=0, old_grid=(2, 3))
  rows = np.linspace(0, 1, 3)[:, None]
  cols = np.linspace(0, 2, 5)[None, :]
  # Bilinear of a linear function, corner to corner, is that function.
  np.testing.assert_allclose(out.reshape(3, 5), 3 * rows + cols, atol=1e-9)
  with pytest.raises(ValueError, match='not a square'):
    resize_posemb(posemb, 10, num_prefix_tokens=0)


def test_resize_bicubic_matches_torch_convention():
  # Hand-computed torch bicubic (a=-0.75, half-pixel centres, edge clamp) of
  # [0, 1] -> 4 samples. Sample 1 reads x = 0.25: taps x-1,x,x+1,x+2 at
  # distances 1.25, .25, .75, 1.75; weights of the value-1 taps:
  # W(.75) = (1.25*.75 - 2.25)*.75^2 + 1 = .26171875,
  # W(1.75) = ((-.75*1.75 + 3.75)*1.75 - 6)*1.75 + 3 = -.03515625.
  want = np.array([-0.10546875, 0.2265625, 0.7734375, 1.10546875])
  posemb = np.array([5.0, 0.0, 1.0]).reshape(1, 3, 1)  # cls + 1x2 grid.
  out = resize_posemb(posemb, (1, 4), num_prefix_tokens=1, old_grid=(1, 2),
                      method='bicubic')
  assert out[0, 0, 0] == 5.0
  np.testing.assert_allclose(out[0, 1:, 0], want, atol=1e-12)
  # jax.image.resize uses Keys a=-0.5 and a different border: not timm's.
  jax_out = jax.image.resize(jnp.array([0., 1.]), (4,), 'cubic')
  assert abs(float(jax_out[1]) - want[1]) > 0.01
  # 2-D is separable: a 2x2 grid [[0,1],[0,1]] gives the 1-D values per row.
  grid = np.array([0.0, 1.0, 0.0, 1.0]).reshape(1, 4, 1)
  out2 = resize_posemb(grid, 16, num_prefix_tokens=0, method='bicubic')
  np.testing.assert_allclose(out2.reshape(4, 4), np.tile(want, (4, 1)),
                             atol=1e-12)


# -------------------------------------------------------------- load_pretrained


def test_load_pretrained_replaces_head_and_resizes_posemb(tmp_path):
  ckpt = vit_flat(seed=1, num_classes=1000, pre_logits=True)
  save_npz(tmp_path / 'pre.npz', unflatten_params(ckpt))
  init = vit_flat(seed=2, num_classes=10, grid=6)
  init['head/kernel'][:] = 0.0
  init[POSEMB] = init[POSEMB].astype(np.float16)  # dtypes follow init.
  logs = []
  params, report = load_pretrained(tmp_path / 'pre.npz', unflatten_params(init),
                                   log=logs.append)
  flat = flatten_params(params)
  assert sorted(flat) == sorted(init)
  np.testing.assert_array_equal(flat['head/kernel'], 0.0)
  assert flat['head/kernel'].shape == (D, 10)
  np.testing.assert_array_equal(flat['embedding/kernel'],
                                ckpt['embedding/kernel'])
  assert flat[POSEMB].shape == (1, 37, D) and flat[POSEMB].dtype == np.float16
  np.testing.assert_array_equal(flat[POSEMB][:, 0], 0.0)
  want = resize_posemb(ckpt[POSEMB], 37, num_prefix_tokens=1)
  np.testing.assert_allclose(flat[POSEMB], want, atol=1e-3)
  assert report.resized == {POSEMB: ((1, 17, D), (1, 37, D))}
  assert report.reinitialised == ['head/kernel', 'head/bias']
  assert sorted(report.left_out) == ['head/bias', 'head/kernel',
                                     'pre_logits/bias', 'pre_logits/kernel']
  assert 'embedding/kernel' in report.loaded
  assert len(logs) == 1 and 'resized' in logs[0]


@pytest.mark.parametrize('keep', [None, True, False])
def test_load_pretrained_keeps_pre_logits_if_model_has_it(tmp_path, keep):
  ckpt = vit_flat(seed=1, num_classes=1000, pre_logits=True)
  save_npz(tmp_path / 'pre.npz', unflatten_params(ckpt))
  init = vit_flat(seed=2, pre_logits=True)
  params, report = load_pretrained(tmp_path / 'pre.npz', unflatten_params(init),
                                   keep_pre_logits=keep, log=lambda _: None)
  source = init if keep is False else ckpt
  np.testing.assert_array_equal(params['pre_logits']['kernel'],
                                source['pre_logits/kernel'])
  assert ('pre_logits/kernel' in report.loaded) == (keep is not False)


def test_load_pretrained_pre_logits_requested_but_absent(tmp_path):
  save_npz(tmp_path / 'pre.npz', unflatten_params(vit_flat(pre_logits=True)))
  with pytest.raises(ValueError, match='no pre_logits layer'):
    load_pretrained(tmp_path / 'pre.npz', unflatten_params(vit_flat()),
                    keep_pre_logits=True)


def test_load_pretrained_keep_head_takes_the_files_classifier(tmp_path):
  ckpt = vit_flat(seed=1, num_classes=10)
  save_npz(tmp_path / 'pre.npz', unflatten_params(ckpt))
  init = unflatten_params(vit_flat(seed=2, num_classes=10))
  params, report = load_pretrained(tmp_path / 'pre.npz', init, keep_head=True,
                                   log=lambda _: None)
  np.testing.assert_array_equal(params['head']['kernel'], ckpt['head/kernel'])
  assert 'head/kernel' in report.loaded and not report.reinitialised
  with pytest.raises(ValueError, match='10 classes there, 7 in the model'):
    load_pretrained(tmp_path / 'pre.npz',
                    unflatten_params(vit_flat(num_classes=7)), keep_head=True)


def test_load_pretrained_lists_missing_and_unexpected(tmp_path):
  save_npz(tmp_path / 'pre.npz', unflatten_params(vit_flat(layers=2)))
  with pytest.raises(ValueError) as err:
    load_pretrained(tmp_path / 'pre.npz',
                    unflatten_params(vit_flat(layers=3)))
  msg = str(err.value)
  assert 'Missing from the checkpoint' in msg
  assert 'Transformer/encoderblock_2/LayerNorm_0/scale' in msg
  assert 'layers 2 vs 3' in msg

  save_npz(tmp_path / 'tok.npz', unflatten_params(vit_flat(cls=True)))
  with pytest.raises(ValueError) as err:
    load_pretrained(tmp_path / 'tok.npz', unflatten_params(vit_flat(cls=False)))
  msg = str(err.value)
  assert 'Unexpected in the checkpoint (1): cls' in msg
  assert 'different pooling' in msg


def test_load_pretrained_shape_mismatch_names_key_and_shapes(tmp_path):
  save_npz(tmp_path / 'pre.npz', unflatten_params(vit_flat(hidden=32)))
  with pytest.raises(ValueError) as err:
    load_pretrained(tmp_path / 'pre.npz', unflatten_params(vit_flat(hidden=16)))
  msg = str(err.value)
  assert 'embedding/bias: checkpoint (32,) vs model (16,)' in msg
  assert f'{POSEMB}: checkpoint (1, 17, 32) vs model (1, 17, 16)' in msg
  assert 'hidden size 32 vs 16' in msg


def test_load_pretrained_rejects_variables_dict(tmp_path):
  save_npz(tmp_path / 'pre.npz', unflatten_params(vit_flat()))
  with pytest.raises(ValueError, match=re.escape("variables['params']")):
    load_pretrained(tmp_path / 'pre.npz',
                    {'params': unflatten_params(vit_flat())})


def test_public_names_are_importable_from_the_package():
  # The names the README and docs/models.md give users.
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  for name in ('save_npz', 'load_npz', 'load_pretrained', 'load_params'):
    assert callable(getattr(checkpoint, name)), name
