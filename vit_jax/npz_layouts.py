"""Flat '/'-joined param names and the three `.npz` naming layouts.

Released files name encoder-block modules in call order (`LayerNorm_0`,
`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`), which are this
project's module names. Linen code (the official repo's Linen models,
big_vision) numbers them per class (`MultiHeadDotProductAttention_0`,
`LayerNorm_1`, `MlpBlock_0`). big_vision files also prefix `params/`, keep the
posemb at the top level without a cls row, and may stack all blocks as
`Transformer/encoderblock/...` along a leading [layers] axis.
`convert_to_released_layout` maps the latter two to the first.
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
    flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Splits `Transformer/encoderblock/x` [L, ...] into `encoderblock_{i}/x`."""
  scanned = {k: v for k, v in flat.items() if k.startswith(_SCANNED_PREFIX)}
  if not scanned:
    return flat
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


# ---------------------------------------------------------------- log lines


_NUMBERED_BLOCK = re.compile(r'^(.*?(?:encoderblock_|MixerBlock_))(\d+)/')


def summarize_names(names: list[str]) -> str:
  """A short, complete listing of flat param names for a log line.

  Names are grouped by module and numbered blocks are folded into a range, so a
  ViT-B's 152 backbone tensors read as `embedding/* (2), cls,
  Transformer/posembed_input/pos_embedding, Transformer/encoderblock_{0-11}/*
  (192), Transformer/encoder_norm/* (2)`: every tensor is accounted for.
  """
  groups: dict[str, tuple[list[str], set[int]]] = {}
  for name in names:
    block = _NUMBERED_BLOCK.match(name)
    if block:
      key = block.group(1) + '{}/*'
    else:
      key = name.rsplit('/', 1)[0] + '/*' if '/' in name else name
    members, blocks = groups.setdefault(key, ([], set()))
    members.append(name)
    if block:
      blocks.add(int(block.group(2)))
  parts = []
  for key, (members, blocks) in groups.items():
    if len(members) == 1:
      key = members[0]
    elif blocks:
      key = key.format('{' + _ranges(sorted(blocks)) + '}')
    parts.append(f'{key} ({len(members)})' if len(members) > 1 else key)
  return ', '.join(parts) if parts else 'none'


def _ranges(numbers: list[int]) -> str:
  """[0, 1, 2, 5] -> '0-2,5'."""
  spans: list[list[int]] = []
  for n in numbers:
    if spans and n == spans[-1][1] + 1:
      spans[-1][1] = n
    else:
      spans.append([n, n])
  return ','.join(str(a) if a == b else f'{a}-{b}' for a, b in spans)
