"""The JSON side of a Hugging Face ViT directory: config.json written and
checked, preprocessor_config.json written.

Apart from hf.py (the tensors) because the checks of a file from outside
are their own job: every field ours reads is checked for type and range
before any tensor name is built from it, and what params cannot carry (the
activation's form, the LayerNorm epsilon) is compared with ours and logged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
from etils import epath

CONFIG_FILE = 'config.json'
PREPROCESSOR_FILE = 'preprocessor_config.json'
ARCHITECTURE = 'ViTForImageClassification'
_READ_ARCHITECTURES = (ARCHITECTURE, 'ViTModel')
# transformers' hidden_act -> GELU's tanh form (our gelu_approximate=True).
HIDDEN_ACTS = {'gelu_pytorch_tanh': True, 'gelu_new': True, 'gelu': False}
LAYER_NORM_EPS = 1e-6  # Ours (vit.py); HF's default is 1e-12.
_SIZE_FIELDS = ('hidden_size', 'num_hidden_layers', 'num_attention_heads',
                'intermediate_size', 'image_size', 'patch_size')
# Sizes config.json may leave out (transformers' defaults then apply).
_OPTIONAL_SIZE_FIELDS = ('num_channels', 'head_dim', 'pooler_output_size')


def vit_config(*, hidden_size: int, num_layers: int, num_heads: int,
               mlp_dim: int, image_size: int, patch_size: tuple[int, int],
               channels: int, class_names: Sequence[str],
               gelu_approximate: bool) -> dict[str, Any]:
  """The config.json of a ViTForImageClassification computing our ViT."""
  ph, pw = patch_size
  return dict(
      architectures=[ARCHITECTURE], model_type='vit', hidden_size=hidden_size,
      num_hidden_layers=num_layers, num_attention_heads=num_heads,
      intermediate_size=mlp_dim,
      hidden_act='gelu_pytorch_tanh' if gelu_approximate else 'gelu',
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      initializer_range=0.02, layer_norm_eps=LAYER_NORM_EPS,
      image_size=int(image_size), patch_size=ph if ph == pw else [ph, pw],
      num_channels=int(channels), qkv_bias=True, torch_dtype='float32',
      id2label={str(i): str(n) for i, n in enumerate(class_names)},
      label2id={str(n): i for i, n in enumerate(class_names)})


def preprocessor_config(image_size: int, channels: int) -> dict[str, Any]:
  """A ViTImageProcessor for our input: uint8 -> [0, 1] -> (x - 0.5) / 0.5,
  i.e. [-1, 1] as our eval pipeline's `to_model_range`, after a bilinear
  resize to `image_size`."""
  return dict(image_processor_type='ViTImageProcessor', do_resize=True,
              size=dict(height=int(image_size), width=int(image_size)),
              resample=2,  # PIL.Image.BILINEAR
              do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
              image_mean=[0.5] * channels, image_std=[0.5] * channels)


def read_hf_config(path: str | epath.PathLike) -> dict[str, Any]:
  """The parsed config.json of the HF directory `path`, checked to be a ViT
  whose layers ours can compute.

  Raises:
    ValueError: not JSON, another model_type or architecture, missing or
      non-integer sizes, no q/k/v bias, an activation other than GELU, a
      layer_norm_eps that is no number or an id2label that is no mapping.
  """
  file = epath.Path(path) / CONFIG_FILE
  try:
    config = json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{file} is not JSON ({e})') from None
  if not isinstance(config, dict):
    raise ValueError(f'{file} holds a {type(config).__name__}, not an object')
  if config.get('model_type') != 'vit':
    raise ValueError(f"{file}: model_type {config.get('model_type')!r}; only "
                     "Hugging Face ViT (model_type 'vit') maps to our ViT")
  architectures = config.get('architectures') or [ARCHITECTURE]
  if not set(architectures) <= set(_READ_ARCHITECTURES):
    raise ValueError(f'{file}: architectures {architectures}; read are '
                     f'{list(_READ_ARCHITECTURES)}')
  given = [k for k in _OPTIONAL_SIZE_FIELDS if config.get(k) is not None]
  for key in (*_SIZE_FIELDS, *given):
    value = config.get(key)
    values = value if isinstance(value, list) and len(value) == 2 else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
               for v in values):
      raise ValueError(f'{file}: {key} must be a positive integer, got {value!r}')
  if not config.get('qkv_bias', True):
    raise ValueError(f'{file}: qkv_bias is false; our attention always has '
                     'query/key/value biases')
  act = config.get('hidden_act', 'gelu')
  if not isinstance(act, str) or act not in HIDDEN_ACTS:
    raise ValueError(f'{file}: hidden_act {act!r}; our MLP computes GELU '
                     f'({sorted(HIDDEN_ACTS)})')
  eps = config.get('layer_norm_eps', 1e-12)
  if isinstance(eps, bool) or not isinstance(eps, (int, float)):
    raise ValueError(f'{file}: layer_norm_eps must be a number, got {eps!r}')
  if not isinstance(config.get('id2label') or {}, dict):
    raise ValueError(f"{file}: id2label must map class indices to names, got "
                     f"{config['id2label']!r}")
  return config


def log_numerics(path: epath.Path, config: Mapping[str, Any]) -> None:
  if not HIDDEN_ACTS[act := config.get('hidden_act', 'gelu')]:
    logging.warning('%s: hidden_act %r is GELU\'s exact (erf) form; set '
                    'model.gelu_approximate=False to compute the same function '
                    '(ours defaults to the tanh form).', path, act)
  eps = config.get('layer_norm_eps', 1e-12)
  if eps != LAYER_NORM_EPS:
    logging.warning('%s: layer_norm_eps %g; our LayerNorms use %g.', path, eps,
                    LAYER_NORM_EPS)
