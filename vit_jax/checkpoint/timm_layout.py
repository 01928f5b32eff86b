"""timm VisionTransformer state dicts (`.safetensors`) in the released layout.

timm names (torch layouts; vit_jax.checkpoint.torch_layout moves the axes):

  cls_token [1, 1, d]              cls
  pos_embed [1, tokens, d]         Transformer/posembed_input/pos_embedding
  patch_embed.proj.{weight,bias}   embedding/{kernel,bias}
  blocks.{i}.norm1 / norm2         encoderblock_{i}/LayerNorm_0 / LayerNorm_2
  blocks.{i}.attn.qkv [3d, d]      .../MultiHeadDotProductAttention_1/{query,key,value}
  blocks.{i}.attn.proj             .../MultiHeadDotProductAttention_1/out
  blocks.{i}.mlp.fc1 / fc2         .../MlpBlock_3/Dense_0 / Dense_1
  norm                             Transformer/encoder_norm
  head                             head

A state dict does not say how the model used it: the number of heads (`qkv`
fuses them: they come from the model that loads it), the pooling (a cls token
means 'token' pooling here, none 'gap') or the activation (timm's ViTs use
GELU's exact form by default; set `model.gelu_approximate=False` for the same
function). A pos_embed without the cls row (timm's `no_embed_class`) gets a
zero row, which is what the cls token then adds. timm features our ViT does
not compute are refused by name (`_UNMAPPED`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from typing import Any

from etils import epath
import numpy as np

from vit_jax.checkpoint import safetensors_file
from vit_jax.checkpoint import torch_layout
from vit_jax.checkpoint.layouts import POSEMB_KEY

_ATTN = 'MultiHeadDotProductAttention_1'
_BLOCK = re.compile(r'^blocks\.(\d+)\.(.+)$')
# Per block: timm name after `blocks.{i}.` -> (ours after
# `Transformer/encoderblock_{i}/`, torch_layout kind). attn.qkv is split.
_BLOCK_NAMES = {
    'norm1.weight': ('LayerNorm_0/scale', 'same'),
    'norm1.bias': ('LayerNorm_0/bias', 'same'),
    'attn.proj.weight': (f'{_ATTN}/out/kernel', 'heads_out'),
    'attn.proj.bias': (f'{_ATTN}/out/bias', 'same'),
    'norm2.weight': ('LayerNorm_2/scale', 'same'),
    'norm2.bias': ('LayerNorm_2/bias', 'same'),
    'mlp.fc1.weight': ('MlpBlock_3/Dense_0/kernel', 'dense'),
    'mlp.fc1.bias': ('MlpBlock_3/Dense_0/bias', 'same'),
    'mlp.fc2.weight': ('MlpBlock_3/Dense_1/kernel', 'dense'),
    'mlp.fc2.bias': ('MlpBlock_3/Dense_1/bias', 'same'),
}
_QKV = ('attn.qkv.weight', 'attn.qkv.bias')
_TOP_NAMES = {
    'cls_token': ('cls', 'same'),
    'patch_embed.proj.weight': ('embedding/kernel', 'conv'),
    'patch_embed.proj.bias': ('embedding/bias', 'same'),
    'norm.weight': ('Transformer/encoder_norm/scale', 'same'),
    'norm.bias': ('Transformer/encoder_norm/bias', 'same'),
    'head.weight': ('head/kernel', 'dense'),
    'head.bias': ('head/bias', 'same'),
}
_OPTIONAL = ('cls_token', 'head.weight', 'head.bias')
# timm features with no counterpart in our ViT: name pattern -> why.
_UNMAPPED = {
    r'^fc_norm\.': "fc_norm: timm's avg pooling normalises the pooled "
                   'features, LayerNorm(mean(tokens)); our gap model '
                   'normalises every token before the mean',
    r'^attn_pool\.': "attention pooling (global_pool='map') in timm's names; "
                     "big_vision's .npz of such a model loads (MAPHead_0)",
    r'^reg_token$': 'register tokens: our ViT has only the cls token',
    r'^(dist_token|head_dist\.)': "DeiT's distillation token and head",
    r'^norm_pre\.': 'a LayerNorm before the first block (pre_norm)',
    r'^patch_embed\.norm\.': 'a LayerNorm after the patch embedding',
    r'^patch_embed\.backbone\.': "a hybrid CNN stem in timm's names; the "
                                 'released R50+ViT .npz loads instead',
    r'\.ls[12]\.': 'LayerScale (init_values)',
    r'\.attn\.[qk]_norm\.': 'LayerNorm on queries and keys (qk_norm)',
}


def is_timm_state_dict(names: Collection[str]) -> bool:
  """Names of a timm VisionTransformer (its patch embedding or blocks)."""
  return any(n.startswith(('patch_embed.', 'blocks.')) for n in names)


def read_timm_state_dict(path: str | epath.PathLike,
                         like: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The flat released-layout params of a timm ViT `.safetensors` state dict.

  Args:
    path: the file (e.g. `safetensors.torch.save_file(model.state_dict())`).
    like: flat released-layout params of the model that will load it; its
      query kernels [hidden, heads, head_dim] give each block's heads.

  Raises:
    ValueError: a timm feature we do not compute (named with why), a missing
      tensor, or shapes that do not fit together; before any tensor is read.
  """
  shapes = safetensors_file.tensor_shapes(path)
  _refuse_unmapped(path, shapes)
  want = _expected_shapes(path, shapes)
  missing = [n for n in want if n not in shapes and n not in _OPTIONAL]
  unexpected = [n for n in shapes if n not in want]
  if missing or unexpected:
    raise ValueError(f'{path}: not the timm ViT layout we read: missing '
                     f'{missing[:8]}, not mapped {unexpected[:8]}')

  def check(name: str, shape: tuple[int, ...]) -> None:
    if shape != want[name]:
      raise ValueError(f'{path}: {name} has shape {shape}; the file\'s other '
                       f'tensors give {want[name]}')

  inner = want['blocks.0.attn.proj.weight'][1]
  heads = {i: _heads(like, i) for i in _block_numbers(shapes)}
  if any(inner % h for h in heads.values()):
    raise ValueError(f'{path}: q/k/v of width {inner} do not split into the '
                     f"model's heads {sorted(set(heads.values()))}")
  arrays = safetensors_file.read_arrays(path, check)
  flat = {}
  for name, value in arrays.items():
    block = _BLOCK.match(name)
    if name == 'pos_embed':
      flat[POSEMB_KEY] = _with_cls_row(value, 'cls_token' in arrays)
    elif not block:
      ours, kind = _TOP_NAMES[name]
      flat[ours] = torch_layout.from_torch(kind, value)
    else:
      i, rest = int(block.group(1)), block.group(2)
      prefix = f'Transformer/encoderblock_{i}/'
      if rest in _QKV:
        kind = 'heads_in' if rest.endswith('weight') else 'heads_bias'
        for part, proj in zip(np.split(value, 3), ('query', 'key', 'value')):
          leaf = 'kernel' if kind == 'heads_in' else 'bias'
          flat[f'{prefix}{_ATTN}/{proj}/{leaf}'] = torch_layout.from_torch(
              kind, part, heads[i])
      else:
        ours, kind = _BLOCK_NAMES[rest]
        flat[prefix + ours] = torch_layout.from_torch(kind, value, heads[i])
  return flat


def _refuse_unmapped(path, shapes: Mapping[str, Any]) -> None:
  reasons = []
  for pattern, why in _UNMAPPED.items():
    hits = [n for n in shapes if re.search(pattern, n)]
    if hits:
      reasons.append(f'{why} ({hits[0]}{", ..." if len(hits) > 1 else ""})')
  if reasons:
    raise ValueError(f'{path}: this timm model computes what our ViT does '
                     'not:\n  ' + '\n  '.join(reasons))


def _expected_shapes(path, shapes: Mapping[str, tuple[int, ...]]
                     ) -> dict[str, tuple[int, ...]]:
  """timm name -> shape, from the file's patch embedding (hidden size), fc1
  (MLP size), qkv (heads * head_dim), head and pos_embed (their own sizes)."""
  def dim(name: str, axis: int) -> int:
    if name not in shapes:
      raise ValueError(f'{path}: no {name} (a timm ViT has one)')
    return shapes[name][axis]

  hidden = dim('patch_embed.proj.weight', 0)
  if len(shapes['patch_embed.proj.weight']) != 4:
    raise ValueError(f'{path}: patch_embed.proj.weight has shape '
                     f"{shapes['patch_embed.proj.weight']}, not [d, c, p, p]")
  blocks = _block_numbers(shapes)
  if blocks != list(range(len(blocks))) or not blocks:
    raise ValueError(f'{path}: blocks must be numbered 0..L-1; got {blocks}')
  mlp = dim('blocks.0.mlp.fc1.weight', 0)
  inner = dim('blocks.0.attn.qkv.weight', 0) // 3
  tokens = dim('pos_embed', 1)
  want = {'pos_embed': (1, tokens, hidden), 'cls_token': (1, 1, hidden),
          'patch_embed.proj.weight': shapes['patch_embed.proj.weight'],
          'patch_embed.proj.bias': (hidden,), 'norm.weight': (hidden,),
          'norm.bias': (hidden,)}
  if 'head.weight' in shapes:
    classes = shapes['head.weight'][0]
    want.update({'head.weight': (classes, hidden), 'head.bias': (classes,)})
  per_block = {'norm1.weight': (hidden,), 'norm1.bias': (hidden,),
               'attn.qkv.weight': (3 * inner, hidden),
               'attn.qkv.bias': (3 * inner,),
               'attn.proj.weight': (hidden, inner), 'attn.proj.bias': (hidden,),
               'norm2.weight': (hidden,), 'norm2.bias': (hidden,),
               'mlp.fc1.weight': (mlp, hidden), 'mlp.fc1.bias': (mlp,),
               'mlp.fc2.weight': (hidden, mlp), 'mlp.fc2.bias': (hidden,)}
  for i in blocks:
    want.update({f'blocks.{i}.{k}': v for k, v in per_block.items()})
  return want


def _block_numbers(names: Collection[str]) -> list[int]:
  return sorted({int(m.group(1)) for m in map(_BLOCK.match, names) if m})


def _with_cls_row(posemb: np.ndarray, has_cls: bool) -> np.ndarray:
  """timm's `no_embed_class` posemb (a square grid, no cls row) with the zero
  row our layout stores for the cls token; others unchanged."""
  tokens = posemb.shape[1]
  if has_cls and math.isqrt(tokens) ** 2 == tokens:
    return np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
  return posemb


def _heads(like: Mapping[str, Any], block: int) -> int:
  """Heads of block `block` of the model (block 0's where it has fewer
  blocks: load_pretrained then names the extra ones)."""
  for i in (block, 0):
    kernel = like.get(f'Transformer/encoderblock_{i}/{_ATTN}/query/kernel')
    if kernel is not None:
      return int(np.shape(kernel)[1])
  raise ValueError('a timm ViT state dict loads into a ViT with attention '
                   'blocks (Transformer/encoderblock_i/'
                   f'{_ATTN}); the model has none')
