"""Named model variants: official names -> ConfigDict -> flax Module.

Variants are data, the model classes stay generic: `get_model_config('ViT-B_16')`
gives the paper's hyperparameters and `create_model` turns any such config (plus
overrides such as `classifier='gap'` or `precision='mixed_bf16'`) into a Module.

ViT configs also carry two compile-time switches that keep the numerics:
`scan_layers` (encoder blocks as one nn.scan, stacked params) and
`remat_policy` (one of vit.REMAT_POLICIES); both are validated here, before
anything is traced, as is `tome_r` (token merging, vit_jax.models.tome), whose
token count `check_image_size` checks. `num_heads` may be one count per
encoder block, with `head_dim` (a model whose pruned heads were dropped,
vit_jax.models.head_counts).
"""

import difflib
from typing import Any, Callable

import flax.linen as nn
import ml_collections

from vit_jax.config_checks import ConfigError
from vit_jax.models import head_counts
from vit_jax.models.conv_stem import conv_stem_grid
from vit_jax.models.mixer import MlpMixer
from vit_jax.models.precision import POLICIES
from vit_jax.models.precision import get_policy
from vit_jax.models.resnet import stem_stride
from vit_jax.models.tome import merge_schedule
from vit_jax.models.vit import VisionTransformer
from vit_jax.models.vit import check_mixer
from vit_jax.models.vit import check_remat_policy

_REGISTRY: dict[str, Callable[[], ml_collections.ConfigDict]] = {}

# ViT sizes (paper Table 1, plus Ti and S from DeiT/AugReg):
#   name: (hidden_size, num_layers, num_heads, mlp_dim)
_VIT_SIZES = {
    'Ti': (192, 12, 3, 768),
    'S': (384, 12, 6, 1536),
    'B': (768, 12, 12, 3072),
    'L': (1024, 24, 16, 4096),
    'H': (1280, 32, 16, 5120),
    'test': (32, 2, 2, 64),  # Tiny model for tests and the CPU quickstart.
}
_VIT_PATCHES = {'Ti': (16,), 'S': (16, 32), 'B': (8, 16, 32), 'L': (16, 32),
                'H': (14,), 'test': (4,)}
# Hybrids: name -> (ViT size, patch of the ViT it is built from, ResNet stages).
_HYBRIDS = {
    'R50+ViT-B_16': ('B', 16, (3, 4, 9)),
    'R26+ViT-S_32': ('S', 32, (2, 2, 2, 2)),
    'R26+ViT-B_32': ('B', 32, (2, 2, 2, 2)),
    'R50+ViT-L_32': ('L', 32, (3, 4, 6, 3)),
    'R-test+ViT-test': ('test', 4, (1,)),
}
# Mixer: size -> (hidden_size, num_layers, tokens_mlp_dim, channels_mlp_dim).
_MIXER_SIZES = {'B': (768, 12, 384, 3072), 'L': (1024, 24, 512, 4096),
                'test': (32, 2, 16, 64)}
_MIXER_PATCHES = {'B': (16, 32), 'L': (16, 32), 'test': (4,)}
# GFNet isotropic variants (Rao et al. 2021; official main_gfnet.py), patch 16,
# mlp ratio 4: name -> (hidden_size, num_layers, drop path rate at the last
# block, growing linearly from 0 as in the official code). num_heads only sizes
# a MAP head (hidden / 64). Paper (quoted, ImageNet-1k 224 px): 7M / 16M /
# 25M / 43M params, top-1 74.6 / 78.6 / 80.0 / 80.7.
_GFNET_SIZES = {'Ti': (256, 12, 0.0), 'XS': (384, 12, 0.0),
                'S': (384, 19, 0.15), 'B': (512, 19, 0.25),
                'test': (32, 2, 0.0)}
# AFNO mixing in place of attention (Guibas et al. 2022) at these ViT sizes.
_AFNO_SIZES = {'Ti': 16, 'S': 16, 'B': 16, 'test': 4}



def _register(name: str, make: Callable[[], ml_collections.ConfigDict]) -> None:
  _REGISTRY[name] = make


def _vit_config(name: str, size: str, patch: int, **extra) -> ml_collections.ConfigDict:
  hidden, layers, heads, mlp = _VIT_SIZES[size]
  config = ml_collections.ConfigDict(dict(
      name=name, model_type='vit', patch_size=(patch, patch), hidden_size=hidden,
      num_layers=layers, num_heads=heads, mlp_dim=mlp, dropout_rate=0.0,
      attention_dropout_rate=0.0, stochastic_depth=0.0, classifier='token',
      posemb='learn', head_bias_init=0.0, precision='float32', attention_impl='xla',
      scan_layers=False, remat_policy='none', conv_stem=(),
      conv_stem_depth=1, token_mixer='attention', gelu_approximate=True,
      favor_features=256, favor_kernel='positive', favor_seed=0,
      afno_num_blocks=8, afno_sparsity_threshold=0.01,
      afno_hard_thresholding_fraction=1.0, afno_hidden_size_factor=1,
      afno_double_skip=True, tome_r=0))
  # None-valued fields must exist before overrides can set them.
  config.representation_size = None
  config.head_dim = None  # None: hidden_size // num_heads.
  config.resnet = None
  config.update(extra)
  return config


def _gfnet_config(name: str, size: str) -> ml_collections.ConfigDict:
  hidden, layers, drop_path = _GFNET_SIZES[size]
  patch = 4 if size == 'test' else 16
  config = _vit_config(name, 'test' if size == 'test' else 'B', patch,
                       token_mixer='global_filter', classifier='gap',
                       gelu_approximate=False, stochastic_depth=drop_path)
  config.update(hidden_size=hidden, num_layers=layers,
                num_heads=max(hidden // 64, 1) if size != 'test' else 2,
                mlp_dim=4 * hidden)
  return config


def _mixer_config(name: str, size: str, patch: int) -> ml_collections.ConfigDict:
  hidden, layers, tokens, channels = _MIXER_SIZES[size]
  return ml_collections.ConfigDict(dict(
      name=name, model_type='mixer', patch_size=(patch, patch), hidden_size=hidden,
      num_layers=layers, tokens_mlp_dim=tokens, channels_mlp_dim=channels,
      precision='float32'))


def _register_all() -> None:
  for size, patches in _VIT_PATCHES.items():
    for patch in patches:
      name = f'ViT-{size}_{patch}'
      _register(name, lambda n=name, s=size, p=patch: _vit_config(n, s, p))
      _register(f'{name}-gap', lambda n=name, s=size, p=patch: _vit_config(
          f'{n}-gap', s, p, classifier='gap'))
  for name, (size, patch, stages) in _HYBRIDS.items():
    _register(name, lambda n=name, s=size, p=patch, st=stages: _vit_config(
        n, s, p, patch_size=(1, 1),
        resnet=ml_collections.ConfigDict(dict(num_layers=st, width_factor=1))))
  for size in _GFNET_SIZES:
    name = f'GFNet-{size}'
    _register(name, lambda n=name, s=size: _gfnet_config(n, s))
  for size, patch in _AFNO_SIZES.items():
    name = f'AFNO-{size}_{patch}'
    _register(name, lambda n=name, s=size, p=patch: _vit_config(
        n, s, p, token_mixer='afno', classifier='gap', gelu_approximate=False))
  for size, patches in _MIXER_PATCHES.items():
    for patch in patches:
      name = f'Mixer-{size}_{patch}'
      _register(name, lambda n=name, s=size, p=patch: _mixer_config(n, s, p))


_register_all()


def list_models() -> list[str]:
  """All registered model names."""
  return sorted(_REGISTRY)


def get_model_config(name: str) -> ml_collections.ConfigDict:
  """The ConfigDict of a registered variant (a fresh copy, safe to modify)."""
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, _REGISTRY, n=3)
    hint = f' Did you mean {close}?' if close else ''
    raise ValueError(f'Unknown model {name!r}.{hint} Valid names: {list_models()}')
  return _REGISTRY[name]()


# Model fields whose registry value does not give their type: None-valued
# ints, and num_heads, an int or one count per block (head_counts.py).
_SECTION_TYPES = {'representation_size': int, 'head_dim': int, 'num_heads': object}


def model_section(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The `config.model` section of a training config.

  Holds `name` plus every field of the variant as a typed None ("use the
  variant's value"), so the command line can override any of them
  (`--config.model.dropout_rate=0.1`) and changing `--config.model.name` never
  keeps a stale field of the previous variant.
  """
  base = get_model_config(name)
  section = ml_collections.ConfigDict({'name': name})
  for key, value in base.items():
    if key in ('name', 'model_type', 'resnet'):
      continue
    field_type = _SECTION_TYPES.get(key, type(value))
    section[key] = ml_collections.FieldReference(None, field_type=field_type)
  unknown = sorted(set(overrides) - set(section))
  if unknown:
    raise ValueError(f'Unknown model field(s) {unknown} for {name}; '
                     f'valid: {sorted(section)}')
  section.update(overrides)
  return section


def _resolve(name_or_config: str | ml_collections.ConfigDict,
             overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """Registered config (or a copy of the given one) with overrides applied."""
  if isinstance(name_or_config, str):
    config = get_model_config(name_or_config)
  else:
    config = ml_collections.ConfigDict(name_or_config)
    if 'model_type' not in config:  # A training config's `model`: name + overrides.
      overrides = dict({k: v for k, v in config.items()
                        if k != 'name' and v is not None}, **overrides)
      config = get_model_config(config.name)
  unknown = sorted(set(overrides) - set(config))
  if unknown:
    hint = ''
    if 'dtype' in unknown:
      hint = (' (model.dtype was replaced by model.precision: one of '
              f'{", ".join(POLICIES)}; mixed_bf16 is bf16 products with '
              'float32 elsewhere, bfloat16 what model.dtype=bfloat16 was)')
    elif config.model_type == 'mixer' and 'tome_r' in unknown:
      hint = (' (an MLP-Mixer cannot merge tokens: its token-mixing MLPs are '
              'sized to a fixed token count, and there are no attention keys '
              'to match on; tome_r needs a ViT)')
    raise ValueError(f'Unknown model override(s) {unknown} for {config.name}'
                     f'{hint}; valid: {sorted(config)}')
  if head_counts.is_per_block(overrides.get('num_heads')):
    del config['num_heads']  # An int in the registry; a tuple replaces it.
  config.update(overrides)
  return config


def create_model(name_or_config: str | ml_collections.ConfigDict,
                 num_classes: int | None, **overrides: Any) -> nn.Module:
  """Builds the flax Module for a registered name or a model ConfigDict.

  Args:
    name_or_config: a registered name ('ViT-B_16'), a registry ConfigDict, or a
      training config's `model` section (`name` plus override keys).
    num_classes: size of the zero-initialised `head`; None returns features.
    **overrides: fields to change, e.g. `classifier='gap'`, `precision='mixed_bf16'`,
      `scan_layers=True`, `remat_policy='dots_saveable'`.

  Raises:
    ValueError: unknown name, override, precision policy or remat policy.
  """
  config = _resolve(name_or_config, overrides)
  get_policy(config.precision)  # Raises for an unknown policy.
  kwargs = {k: v for k, v in config.items() if k not in ('name', 'model_type')}
  kwargs['patch_size'] = tuple(config.patch_size)
  if config.model_type == 'mixer':
    return MlpMixer(num_classes=num_classes, **kwargs)
  check_remat_policy(config.remat_policy)
  check_mixer(config)
  if not isinstance(config.scan_layers, bool):
    raise ValueError(f'scan_layers must be True or False, got {config.scan_layers!r}')
  if head_counts.is_per_block(kwargs.get('num_heads')):
    kwargs['num_heads'] = tuple(kwargs['num_heads'])
  if kwargs.get('conv_stem') is not None:
    kwargs['conv_stem'] = tuple(int(w) for w in kwargs['conv_stem'])
  if kwargs['resnet'] is not None:
    kwargs['resnet'] = dict(num_layers=tuple(config.resnet.num_layers),
                            width_factor=config.resnet.width_factor)
  return VisionTransformer(num_classes=num_classes, **kwargs)


def check_image_size(name_or_config: str | ml_collections.ConfigDict,
                     image_size: int) -> None:
  """Raises ValueError, before any compile, if the model cannot take `image_size`."""
  config = _resolve(name_or_config, {})
  ph, pw = config.patch_size
  if config.get('conv_stem'):
    # Each stride-2 stage maps n pixels to ceil(n / 2); the patch size then
    # applies to the stem's output grid.
    grid = conv_stem_grid(image_size, len(config.conv_stem))
    if grid % ph or grid % pw:
      raise ValueError(
          f'image size {image_size} becomes a {grid}x{grid} grid after the '
          f'{len(config.conv_stem)}-stage conv_stem of {config.name}, which the '
          f'patch size {ph}x{pw} does not divide')
  else:
    stride = 1
    if config.get('resnet') is not None:
      stride = stem_stride(config.resnet.num_layers)
    if image_size % (stride * ph) or image_size % (stride * pw):
      what = f'patch size {ph}x{pw}' + (f' times stem stride {stride}' if stride > 1 else '')
      raise ValueError(f'image size {image_size} is not divisible by the {what} of '
                       f'{config.name}; use a multiple of {stride * max(ph, pw)}')
    grid = image_size // stride
  if config.get('tome_r'):  # Tokens entering block 0: the grid [+ cls].
    prefix = int(config.classifier in ('token', 'token_unpooled'))
    tokens = (grid // ph) * (grid // pw) + prefix
    try:
      merge_schedule(config.tome_r, tokens, prefix, config.num_layers)
    except ValueError as e:
      raise ValueError(f'{e} ({config.name} at image size {image_size})') from None


def check_config(model: ml_collections.ConfigDict, image_size: int) -> None:
  """Raises ConfigError if a training config's `model` section cannot be built
  or cannot take `image_size`; nothing is traced."""
  try:
    create_model(model, 1)
    check_image_size(model, image_size)
  except ValueError as e:
    raise ConfigError(f'config.model / config.input.image_size: {e}') from None
