"""Hugging Face `transformers` ViT directories: write ours, read theirs.

A directory that `transformers.ViTForImageClassification.from_pretrained`
loads holds `config.json` (the architecture), `model.safetensors` (torch
layouts, names below) and `preprocessor_config.json` (a ViTImageProcessor).
The names are the ones transformers writes and the hub's ViTs use
(`vit.embeddings.*`, `vit.encoder.layer.{i}.attention.attention.query.*`, ...,
`vit.layernorm.*`, `classifier.*`; 5.x renames them to its own modules on
load); the tables below pair each with its released name and torch layout
(vit_jax.checkpoint.torch_layout). A ViTModel's `vit.pooler.dense` (a tanh
Dense on the cls token) is read as `pre_logits`, never written.

HF's ViT is one architecture: the cls token's final features into a linear
classifier, learned position embeddings, one patch conv. Models that compute
anything else are refused by `check_exportable`, before anything is written,
since the directory would load and silently give other logits.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath
import numpy as np

from vit_jax.checkpoint import hf_config
from vit_jax.checkpoint import safetensors_file
from vit_jax.checkpoint import torch_layout
from vit_jax.checkpoint.layouts import POSEMB_KEY
from vit_jax.checkpoint.layouts import BLOCK_RE
from vit_jax.checkpoint.layouts import convert_to_released_layout
from vit_jax.checkpoint.layouts import flatten_params
from vit_jax.checkpoint.layouts import unstack_encoder_blocks

WEIGHTS_FILE = 'model.safetensors'
_ATTN = 'MultiHeadDotProductAttention_1'

# One encoder layer: (HF name after `vit.encoder.layer.{i}.`, ours after
# `Transformer/encoderblock_{i}/`, torch_layout kind).
_LAYER = (
    ('layernorm_before.weight', 'LayerNorm_0/scale', 'same'),
    ('layernorm_before.bias', 'LayerNorm_0/bias', 'same'),
    *((f'attention.attention.{p}.weight', f'{_ATTN}/{p}/kernel', 'heads_in')
      for p in ('query', 'key', 'value')),
    *((f'attention.attention.{p}.bias', f'{_ATTN}/{p}/bias', 'heads_bias')
      for p in ('query', 'key', 'value')),
    ('attention.output.dense.weight', f'{_ATTN}/out/kernel', 'heads_out'),
    ('attention.output.dense.bias', f'{_ATTN}/out/bias', 'same'),
    ('layernorm_after.weight', 'LayerNorm_2/scale', 'same'),
    ('layernorm_after.bias', 'LayerNorm_2/bias', 'same'),
    ('intermediate.dense.weight', 'MlpBlock_3/Dense_0/kernel', 'dense'),
    ('intermediate.dense.bias', 'MlpBlock_3/Dense_0/bias', 'same'),
    ('output.dense.weight', 'MlpBlock_3/Dense_1/kernel', 'dense'),
    ('output.dense.bias', 'MlpBlock_3/Dense_1/bias', 'same'),
)
_EMBEDDINGS = (
    ('vit.embeddings.cls_token', 'cls', 'same'),
    ('vit.embeddings.position_embeddings', POSEMB_KEY, 'same'),
    ('vit.embeddings.patch_embeddings.projection.weight', 'embedding/kernel',
     'conv'),
    ('vit.embeddings.patch_embeddings.projection.bias', 'embedding/bias',
     'same'),
)
_FINAL = (
    ('vit.layernorm.weight', 'Transformer/encoder_norm/scale', 'same'),
    ('vit.layernorm.bias', 'Transformer/encoder_norm/bias', 'same'),
)
_HEAD = (('classifier.weight', 'head/kernel', 'dense'),
         ('classifier.bias', 'head/bias', 'same'))
_POOLER = (('vit.pooler.dense.weight', 'pre_logits/kernel', 'dense'),
           ('vit.pooler.dense.bias', 'pre_logits/bias', 'same'))

Names = tuple[tuple[str, str, str], ...]


def tensor_names(num_layers: int, *, head: bool = True,
                 pooler: bool = False) -> Names:
  """(HF name, released name, torch_layout kind) of every tensor."""
  layers = tuple(
      (f'vit.encoder.layer.{i}.{hf}', f'Transformer/encoderblock_{i}/{ours}', kind)
      for i in range(num_layers) for hf, ours, kind in _LAYER)
  return (_EMBEDDINGS + layers + _FINAL + (_POOLER if pooler else ())
          + (_HEAD if head else ()))


# ---------------------------------------------------------------- export


def unexportable_reasons(model: Any) -> list[str]:
  """Why HF's ViTForImageClassification cannot compute `model`, a ViT Module
  (or resolved config); [] if it can. A sincos2d posemb is fine, written as
  the fixed table it is (the caller materialises it)."""
  if not hasattr(model, 'classifier'):
    return [f'{type(model).__name__} is not a ViT: HF ViT is attention blocks '
            'over patch tokens (an MLP-Mixer mixes tokens with MLPs)']
  reasons = []
  if model.classifier != 'token':
    reasons.append(
        f'classifier {model.classifier!r}: ViTForImageClassification feeds the '
        "cls token's final features to its classifier ('token'); it cannot "
        "average the tokens ('gap') or pool them with attention ('map')")
  if model.representation_size is not None:
    reasons.append(
        f'a pre_logits layer (representation_size={model.representation_size}): '
        "ViTForImageClassification's classifier reads the cls token directly "
        'and has no tanh layer before it, so the logits would differ')
  if model.resnet is not None:
    reasons.append('a ResNet hybrid stem: HF ViT embeds the image with one '
                   'patch convolution (ViT-Hybrid is another model_type)')
  if getattr(model, 'conv_stem', ()):
    reasons.append('a conv stem: HF ViT embeds the image with one patch '
                   'convolution, no 3x3 convolutions before it')
  if getattr(model, 'token_mixer', 'attention') != 'attention':
    reasons.append(f'token_mixer {model.token_mixer!r}: HF ViT mixes tokens '
                   'with softmax attention only (no GFNet/AFNO filters)')
  if getattr(model, 'attention_impl', 'xla') == 'favor':
    reasons.append("attention_impl 'favor': Performer's random-feature "
                   'estimate is not the exact softmax attention HF computes')
  if getattr(model, 'tome_r', 0):
    reasons.append(f'tome_r={model.tome_r}: token merging drops tokens '
                   'between blocks; HF ViT keeps every token')
  heads = model.num_heads
  if isinstance(heads, (tuple, list)):
    reasons.append(f'per-block head counts {tuple(heads)} (pruned heads '
                   'dropped): HF ViT has one num_attention_heads for all layers')
  elif (getattr(model, 'head_dim', None) is not None
        and model.head_dim * heads != model.hidden_size):
    reasons.append(f'head_dim {model.head_dim} x {heads} heads != hidden_size '
                   f'{model.hidden_size}: HF ViT (before transformers 5) '
                   'splits hidden_size evenly over the heads')
  return reasons


def check_exportable(model: Any) -> None:
  """Raises ValueError listing every reason HF's ViT cannot compute `model`."""
  reasons = unexportable_reasons(model)
  if reasons:
    raise ValueError('this model cannot be written as a Hugging Face ViT '
                     '(transformers computes other logits):\n  '
                     + '\n  '.join(reasons))


def to_hf(flat: Mapping[str, np.ndarray], *, image_size: int, channels: int,
          class_names: Sequence[str], gelu_approximate: bool = True
          ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Released-layout params -> (HF state dict, config.json dict).

  `flat` holds '/'-joined released names, per block, with a learned (or
  materialised fixed) position embedding and a `head` of len(class_names).
  """
  flat = convert_to_released_layout(flat)
  layers = sorted({int(m.group(1)) for m in map(BLOCK_RE.match, flat) if m})
  names = tensor_names(len(layers))
  missing = [ours for _, ours, _ in names if ours not in flat]
  extra = sorted(set(flat) - {ours for _, ours, _ in names})
  if missing or extra or not layers:  # E.g. no cls token, head or blocks.
    raise ValueError(f'params do not map to HF ViT: missing {missing[:6]}, '
                     f'not mapped {extra[:6]}')
  state = {hf: torch_layout.to_torch(kind, np.asarray(flat[ours], np.float32))
           for hf, ours, kind in names}
  hidden = flat['embedding/kernel'].shape[-1]
  _, heads, _ = flat[f'Transformer/encoderblock_0/{_ATTN}/query/kernel'].shape
  ph, pw = flat['embedding/kernel'].shape[:2]
  num_classes = flat['head/kernel'].shape[-1]
  if len(class_names) != num_classes:
    raise ValueError(f'{len(class_names)} class names for a head of '
                     f'{num_classes} classes')
  config = hf_config.vit_config(
      hidden_size=int(hidden), num_layers=len(layers), num_heads=int(heads),
      mlp_dim=int(flat['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel']
                  .shape[-1]),
      image_size=image_size, patch_size=(int(ph), int(pw)), channels=channels,
      class_names=class_names, gelu_approximate=gelu_approximate)
  return state, config


def check_out_dir(out: str | epath.PathLike) -> None:
  """Raises ValueError unless `out` can become a new directory: an empty or
  missing one whose parent exists."""
  out = epath.Path(out)
  if out.exists():
    if not out.is_dir():
      raise ValueError(f'--out {out} is a file; an HF export is a directory')
    if any(out.iterdir()):
      raise ValueError(f'--out {out} exists and is not empty; give a new or '
                       'empty directory')
  elif not out.parent.is_dir():
    raise ValueError(f'the folder {out.parent} of --out {out} does not exist')


def save_hf_dir(out: str | epath.PathLike, params: Mapping[str, Any], *,
                model: Any, image_size: int, channels: int,
                class_names: Sequence[str]) -> dict[str, np.ndarray]:
  """Writes the HF ViT directory `out` of `model`'s `params`; returns the
  state dict written.

  Everything is checked first (`out`, the model, the tensors) and the files
  are written to a temporary sibling directory renamed to `out`, so a refused
  or failed export leaves nothing behind.
  """
  check_out_dir(out)
  check_exportable(model)
  flat = flatten_params(unstack_encoder_blocks(params))
  state, config = to_hf(flat, image_size=image_size, channels=channels,
                        class_names=class_names,
                        gelu_approximate=model.gelu_approximate)
  out = epath.Path(out)
  tmp = out.parent / f'.{out.name}.tmp-{uuid.uuid4().hex}'
  tmp.mkdir()
  try:
    safetensors_file.write_arrays(tmp / WEIGHTS_FILE, state,
                                  metadata={'format': 'pt'})
    (tmp / hf_config.CONFIG_FILE).write_text(json.dumps(config, indent=2) + '\n')
    (tmp / hf_config.PREPROCESSOR_FILE).write_text(
        json.dumps(hf_config.preprocessor_config(image_size, channels), indent=2) + '\n')
    if out.exists():
      out.rmdir()  # Empty (check_out_dir).
    tmp.rename(out)
  except BaseException:
    tmp.rmtree(missing_ok=True)
    raise
  return state


# ---------------------------------------------------------------- import


def is_hf_dir(path: str | epath.PathLike) -> bool:
  """A directory with a config.json (a workdir of ours has none)."""
  path = epath.Path(path)
  return path.is_dir() and (path / hf_config.CONFIG_FILE).is_file()


def read_hf_dir(path: str | epath.PathLike) -> dict[str, np.ndarray]:
  """The flat released-layout params of an HF ViT directory.

  Checks config.json (`hf_config.read_hf_config`), then every tensor's name, dtype and
  shape against it (from the safetensors header) before reading any; logs
  where the config's numerics differ from a default model of ours (exact
  GELU, LayerNorm eps), which params cannot carry.
  """
  path = epath.Path(path)
  config = hf_config.read_hf_config(path)
  weights = path / WEIGHTS_FILE
  if not weights.exists():
    others = sorted(p.name for p in path.iterdir())
    raise ValueError(f'{path} has no {WEIGHTS_FILE} (it holds {others}); a '
                     'sharded or pickled (.bin) checkpoint is not read')
  shapes = {_prefixed(name): (name, shape) for name, shape in
            safetensors_file.tensor_shapes(weights).items()}
  # Names of at most one layer past the file's: where config.json claims
  # more, that layer is reported missing (and a claim of 10**9 layers builds
  # no 10**9 names).
  held = {n.split('.')[3] for n in shapes if n.startswith('vit.encoder.layer.')}
  names = tensor_names(min(config['num_hidden_layers'], len(held) + 1),
                       head='classifier.weight' in shapes,
                       pooler='vit.pooler.dense.weight' in shapes)
  want = _torch_shapes(config, names, shapes)
  missing = [hf for hf in want if hf not in shapes]
  unexpected = [name for hf, (name, _) in shapes.items() if hf not in want]
  if missing or unexpected:
    raise ValueError(f'{weights} does not hold the ViT of its config.json '
                     f'({config["num_hidden_layers"]} layers): missing '
                     f'{missing[:8]}, unexpected {unexpected[:8]}')
  if 'vit.pooler.dense.weight' in shapes and config.get(
      'pooler_act', 'tanh') != 'tanh':
    raise ValueError(f"{path}: pooler_act {config['pooler_act']!r}; our "
                     'pre_logits layer is a tanh Dense')

  def check(name: str, shape: tuple[int, ...]) -> None:
    if shape != want[_prefixed(name)]:
      raise ValueError(f'{weights}: {name} has shape {shape}, config.json '
                       f'gives {want[_prefixed(name)]}')

  arrays = {_prefixed(k): v for k, v in
            safetensors_file.read_arrays(weights, check).items()}
  heads = config['num_attention_heads']
  hf_config.log_numerics(path, config)
  return {ours: torch_layout.from_torch(kind, arrays[hf], heads)
          for hf, ours, kind in names}


def _prefixed(name: str) -> str:
  """A ViTModel's names lack ViTForImageClassification's `vit.` prefix."""
  return name if name.startswith(('vit.', 'classifier.')) else f'vit.{name}'


def _torch_shapes(config: Mapping[str, Any], names: Names,
                  shapes: Mapping[str, tuple[str, tuple[int, ...]]]
                  ) -> dict[str, tuple[int, ...]]:
  """HF name -> the torch shape config.json implies (the classifier's classes:
  its id2label, else the file's)."""
  hidden, heads = config['hidden_size'], config['num_attention_heads']
  mlp = config['intermediate_size']
  head_dim = config.get('head_dim') or hidden // heads
  ph, pw = _pair(config['patch_size'])
  height, width = _pair(config['image_size'])
  tokens = (height // ph) * (width // pw) + 1
  classes = (len(config.get('id2label') or {})
             or shapes.get('classifier.bias', ('', (0,)))[1][0])
  pooled = config.get('pooler_output_size') or hidden
  top = {'cls': (1, 1, hidden), POSEMB_KEY: (1, tokens, hidden),
         'embedding/kernel': (ph, pw, config.get('num_channels', 3), hidden),
         'embedding/bias': (hidden,),
         'Transformer/encoder_norm/scale': (hidden,),
         'Transformer/encoder_norm/bias': (hidden,),
         'head/kernel': (hidden, classes), 'head/bias': (classes,),
         'pre_logits/kernel': (hidden, pooled), 'pre_logits/bias': (pooled,)}
  layer = {f'{ln}/{p}': (hidden,) for ln in ('LayerNorm_0', 'LayerNorm_2')
           for p in ('scale', 'bias')}
  for p in ('query', 'key', 'value'):
    layer[f'{_ATTN}/{p}/kernel'] = (hidden, heads, head_dim)
    layer[f'{_ATTN}/{p}/bias'] = (heads, head_dim)
  layer.update({f'{_ATTN}/out/kernel': (heads, head_dim, hidden),
                f'{_ATTN}/out/bias': (hidden,),
                'MlpBlock_3/Dense_0/kernel': (hidden, mlp),
                'MlpBlock_3/Dense_0/bias': (mlp,),
                'MlpBlock_3/Dense_1/kernel': (mlp, hidden),
                'MlpBlock_3/Dense_1/bias': (hidden,)})
  want = {}
  for hf, ours, kind in names:
    block = BLOCK_RE.match(ours)
    shape = (layer[f'{block.group(2)}/{block.group(3)}'] if block
             else top[ours])
    want[hf] = torch_layout.torch_shape(kind, shape)
  return want


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)
