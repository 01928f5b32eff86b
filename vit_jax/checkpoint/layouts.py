"""Flat '/'-joined param names and the three `.npz` naming layouts.

Released files name encoder-block modules in call order (`LayerNorm_0`,
`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`), which are this
project's module names. Linen code (the official repo's Linen models,
big_vision) numbers them per class (`MultiHeadDotProductAttention_0`,
`LayerNorm_1`, `MlpBlock_0`). big_vision files also prefix `params/`, keep the
posemb at the top level without a cls row, and may stack all blocks as
`Transformer/encoderblock/...` along a leading [layers] axis.
`convert_to_released_layout` maps the latter two to the first.

A model built with `scan_layers=True` has that stacked layout (released module
names inside `encoderblock/`); `stack_encoder_blocks` / `unstack_encoder_blocks`
convert a params tree between it and the per-block one, and `match_block_layout`
puts a tree into the layout of a given model's params.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

POSEMB_KEY = 'Transformer/posembed_input/pos_embedding'
# Encoder-block modules: Linen (numbered per class) -> released (numbered in
# call order). LayerNorm_0 is the same in both.
_LINEN_TO_RELEASED = {
    'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
    'LayerNorm_1': 'LayerNorm_2',
    'MlpBlock_0': 'MlpBlock_3',
}
BLOCK_RE = re.compile(r'^Transformer/encoderblock_(\d+)/([^/]+)/(.+)$')
_SCANNED_PREFIX = 'Transformer/encoderblock/'

Params = dict[str, Any]


# ---------------------------------------------------------------- tree <-> flat


def flatten_params(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flattens a nested params tree to {'a/b/c': numpy array}, in tree order.

  Leaves (jax or numpy arrays, scalars) are converted with `np.asarray`, which
  also fetches device arrays. Empty sub-dicts produce no keys.
  """
  flat: dict[str, np.ndarray] = {}

  def visit(prefix: str, node: Any) -> None:
    if isinstance(node, Mapping):
      for key, child in node.items():
        key = str(key)
        if not key or '/' in key:
          raise ValueError(f"Params key {key!r} under '{prefix}' is empty or "
                           "contains '/', which the .npz format reserves.")
        visit(f'{prefix}/{key}' if prefix else key, child)
    else:
      flat[prefix] = np.asarray(node)

  visit('', tree)
  return flat


def unflatten_params(flat: Mapping[str, Any]) -> Params:
  """Inverse of `flatten_params`: {'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
  tree: Params = {}
  for name, value in flat.items():
    *parents, leaf = name.split('/')
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f'{name!r} nests under a leaf of the same name.')
    if leaf in node:
      raise ValueError(f'{name!r} is both a leaf and a module.')
    node[leaf] = value
  return tree


# ---------------------------------------------------------------- layouts


def convert_to_released_layout(
    flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Converts flat Linen or big_vision names to the released names.

  The layout is decided once per file from its keys (a file mixing the two
  numberings is rejected), so no single key is guessed in isolation.
  Released-layout input is returned unchanged.
  """
  flat = dict(flat)
  if any(k.startswith('params/') for k in flat):  # big_vision: drop opt/ etc.
    flat = {k[len('params/'):]: v for k, v in flat.items()
            if k.startswith('params/')}
  if 'pos_embedding' in flat:
    flat = _big_vision_posemb(flat)
  flat = _unstack_scanned_blocks(flat)
  return _rename_linen_blocks(flat)


def _big_vision_posemb(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Moves big_vision's top-level posemb to the released name.

  big_vision adds the posemb [1, N, D] to the patch tokens and then prepends
  the cls token, so the cls token effectively has a zero posemb row; the
  released layout stores that row, so a zero row is prepended when `cls`
  exists.
  """
  if POSEMB_KEY in flat:
    raise ValueError(f"Checkpoint has both 'pos_embedding' and '{POSEMB_KEY}'.")
  posemb = flat.pop('pos_embedding')
  if 'cls' in flat:
    zero_row = np.zeros_like(posemb[:, :1])
    posemb = np.concatenate([zero_row, posemb], axis=1)
  flat[POSEMB_KEY] = posemb
  return flat


def _unstack_scanned_blocks(
    flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Splits `Transformer/encoderblock/x` [L, ...] into `encoderblock_{i}/x`."""
  scanned = {k: v for k, v in flat.items() if k.startswith(_SCANNED_PREFIX)}
  if not scanned:
    return dict(flat)
  if any(BLOCK_RE.match(k) for k in flat):
    raise ValueError('Checkpoint has both scanned (encoderblock/) and '
                     'unrolled (encoderblock_i/) encoder blocks.')
  depths = {v.shape[0] if v.ndim else 0 for v in scanned.values()}
  if len(depths) != 1 or 0 in depths:
    raise ValueError('Scanned encoder block leaves must share a leading layer '
                     f'axis; got leading sizes {sorted(depths)}.')
  out = {}
  for key, value in flat.items():  # Keep the file's order for the rest.
    if key in scanned:
      rest = key[len(_SCANNED_PREFIX):]
      for i in range(value.shape[0]):
        out[f'Transformer/encoderblock_{i}/{rest}'] = value[i]
    else:
      out[key] = value
  return out


def _stack_blocks(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Inverse of `_unstack_scanned_blocks`: `encoderblock_{i}/x` -> [L, ...].

  The stacked leaves take the place of block 0's, so the rest keeps its order.
  Every block must hold the same names and shapes (a scanned model has one
  block definition), numbered 0 .. L-1 without gaps.
  """
  if any(k.startswith(_SCANNED_PREFIX) for k in flat):
    if any(BLOCK_RE.match(k) for k in flat):
      raise ValueError('Params have both scanned (encoderblock/) and '
                       'unrolled (encoderblock_i/) encoder blocks.')
    return dict(flat)
  blocks: dict[int, dict[str, np.ndarray]] = {}
  for key, value in flat.items():
    m = BLOCK_RE.match(key)
    if m:
      blocks.setdefault(int(m.group(1)), {})[f'{m.group(2)}/{m.group(3)}'] = value
  if not blocks:
    return dict(flat)
  if sorted(blocks) != list(range(len(blocks))):
    raise ValueError('Encoder blocks to stack must be numbered 0..L-1 without '
                     f'gaps; got {sorted(blocks)}.')
  first = blocks[0]
  for i, block in blocks.items():
    shapes = {k: np.shape(v) for k, v in block.items()}
    if shapes != {k: np.shape(v) for k, v in first.items()}:
      raise ValueError(f'encoderblock_{i} differs from encoderblock_0 in its '
                       'names or shapes; only identical blocks can be stacked.')
  out = {}
  for key, value in flat.items():
    m = BLOCK_RE.match(key)
    if not m:
      out[key] = value
    elif m.group(1) == '0':
      rest = f'{m.group(2)}/{m.group(3)}'
      out[_SCANNED_PREFIX + rest] = np.stack(
          [np.asarray(blocks[i][rest]) for i in range(len(blocks))])
  return out


def is_scanned(params: Mapping[str, Any]) -> bool:
  """True if a nested or flat params tree stacks its encoder blocks.

  Reads only the names, so `params` may be abstract (ShapeDtypeStructs).
  """
  if any(str(k).startswith(_SCANNED_PREFIX) for k in params):  # Flat names.
    return True
  transformer = params.get('Transformer')
  return isinstance(transformer, Mapping) and 'encoderblock' in transformer


def stack_encoder_blocks(params: Mapping[str, Any]) -> Params:
  """Per-block params (`encoderblock_{i}/...`) -> a scanned model's layout.

  Args:
    params: nested params tree (numpy or jax leaves), e.g. from `load_npz`.
  Returns:
    Nested numpy tree where `Transformer/encoderblock/<module>/<leaf>` is
    [num_layers, ...] (the leaves of blocks 0..L-1 stacked). A tree that is
    already stacked, or has no encoder blocks (Mixer), comes back unchanged.
  """
  return unflatten_params(_stack_blocks(flatten_params(_nested(params))))


def unstack_encoder_blocks(params: Mapping[str, Any]) -> Params:
  """A scanned model's params -> the released per-block layout.

  Inverse of `stack_encoder_blocks`; per-block trees come back unchanged.
  """
  return unflatten_params(
      _unstack_scanned_blocks(flatten_params(_nested(params))))


def match_block_layout(params: Mapping[str, Any],
                       like: Mapping[str, Any]) -> Params:
  """`params` with its encoder blocks stacked or unstacked as in `like`.

  `like` is the params (or abstract params, `jax.eval_shape` of init) of the
  model that will read them; this is the one call wherever a tree from a file
  or workdir meets a model whose `scan_layers` may differ.
  """
  if is_scanned(like):
    return stack_encoder_blocks(params)
  return unstack_encoder_blocks(params)


def _nested(params: Mapping[str, Any]) -> Mapping[str, Any]:
  """A flat '/'-joined dict as a nested one; nested trees as they are."""
  if any('/' in str(k) for k in params):
    return unflatten_params(params)
  return params


def _rename_linen_blocks(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  modules = {m.group(2) for m in map(BLOCK_RE.match, flat) if m}
  linen = modules & set(_LINEN_TO_RELEASED)
  released = modules & set(_LINEN_TO_RELEASED.values())
  if linen and released:
    raise ValueError('Encoder blocks mix Linen and released module names: '
                     f'{sorted(linen)} and {sorted(released)}.')
  if not linen:
    return flat
  out = {}
  for key, value in flat.items():
    m = BLOCK_RE.match(key)
    if m:
      block, module, rest = m.groups()
      module = _LINEN_TO_RELEASED.get(module, module)
      key = f'Transformer/encoderblock_{block}/{module}/{rest}'
    out[key] = value
  return out
