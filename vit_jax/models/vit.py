"""The Vision Transformer (Dosovitskiy et al., 2021) and its pooling heads.

Module names are the released checkpoints' names, so the parameter tree *is* the
file format: `embedding`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1,
LayerNorm_2, MlpBlock_3}`, `Transformer/encoder_norm`, `pre_logits`, `head`.
Numerics follow the reference: pre-LayerNorm blocks with eps 1e-6, tanh-GELU,
attention scale 1/sqrt(head_dim), zero-initialised `cls` and `head` kernel.

Two switches change how the encoder is compiled, not what it computes:
`scan_layers` runs the blocks as one `nn.scan` (params stacked on a leading
[num_layers] axis under `Transformer/encoderblock/`, the big_vision layout; the
program holds one block instead of num_layers copies), and `remat_policy`
recomputes each block's activations in the backward pass (`jax.checkpoint`)
instead of keeping them, trading compute for memory. On CPU only the two
together cut peak memory; scan alone raised it and slowed the step
(docs/benchmarks.md), and XLA's cost analysis counts a scanned block once.
`checkpoint.layouts.stack_encoder_blocks` / `unstack_encoder_blocks` convert params.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models.attention import MultiHeadDotProductAttention
from vit_jax.models.attention import check_attention
from vit_jax.models.fourier import FourierBlock
from vit_jax.models.fourier import check_afno
from vit_jax.models.heads import MAPHead
from vit_jax.models.conv_stem import ConvStem
from vit_jax.models.layers import DropPath
from vit_jax.models.layers import MlpBlock
from vit_jax.models.precision import get_policy
from vit_jax.models.resnet import resnet_stem
from vit_jax.models import head_counts
from vit_jax.models import tome


CLASSIFIERS = ('token', 'gap', 'map', 'unpooled', 'token_unpooled')
POSEMBS = ('learn', 'sincos2d')
# How each encoder block mixes tokens: softmax attention (any
# MultiHeadDotProductAttention impl, FAVOR+ included) or a Fourier mixer
# (vit_jax.models.fourier), which needs the tokens to be the patch grid.
TOKEN_MIXERS = ('attention', 'global_filter', 'afno')
# Rematerialisation of each encoder block. 'none': keep every activation;
# 'full': keep only each block's input and recompute the rest in the backward
# pass; otherwise a `jax.checkpoint_policies` name saying what may be kept
# ('dots_saveable': matmul outputs, so only the cheap elementwise ops rerun).
REMAT_POLICIES = ('none', 'full', 'dots_saveable',
                  'dots_with_no_batch_dims_saveable', 'nothing_saveable',
                  'everything_saveable')


def check_remat_policy(name: str) -> Callable[..., bool] | None:
  """The `jax.checkpoint` policy for `name` (None: save nothing); raises if unknown."""
  if name not in REMAT_POLICIES:
    raise ValueError(f'remat_policy {name!r} not in {REMAT_POLICIES}')
  if name in ('none', 'full'):
    return None
  return getattr(jax.checkpoint_policies, name)


def check_token_mixer(token_mixer: str, classifier: str) -> None:
  """Raises ValueError for an unknown mixer, or a Fourier mixer with a cls token."""
  if token_mixer not in TOKEN_MIXERS:
    raise ValueError(f'token_mixer {token_mixer!r} not in {TOKEN_MIXERS}')
  if token_mixer != 'attention' and classifier in ('token', 'token_unpooled'):
    raise ValueError(
        f"token_mixer {token_mixer!r} cannot take classifier {classifier!r}: a "
        "cls token has no place in the frequency grid; use 'gap' or 'map'")


def posemb_sincos_2d(height: int, width: int, dim: int,
                     temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding, [1, height * width, dim].

  A quarter of the channels each encode sin/cos of the column and of the row
  index at geometrically spaced frequencies (as in "Better plain ViT baselines").
  """
  if dim % 4:
    raise ValueError(f'sincos2d posemb needs hidden size divisible by 4, got {dim}')
  rows, cols = np.mgrid[:height, :width]
  omega = np.arange(dim // 4) / max(dim // 4 - 1, 1)
  omega = 1.0 / temperature**omega
  rows = np.einsum('m,d->md', rows.reshape(-1), omega)
  cols = np.einsum('m,d->md', cols.reshape(-1), omega)
  pe = np.concatenate([np.sin(cols), np.cos(cols), np.sin(rows), np.cos(rows)], 1)
  return pe[None].astype(np.float32)


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding `pos_embedding` [1, tokens, hidden]."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    posemb = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                        (1, x.shape[1], x.shape[2]))
    return x + posemb.astype(x.dtype)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

  Arguments are positional so that `nn.remat` can hold `deterministic` (and a
  Python-float `drop_path_rate`) static; under `nn.scan` the rate is a traced
  per-layer scalar.
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  precision: str = 'float32'  # A precision.POLICIES name.
  attention_impl: str = 'xla'
  favor_features: int = 256
  favor_kernel: str = 'positive'
  favor_seed: int = 0
  gelu_approximate: bool = True
  tome_r: int = 0      # Tokens this block merges when given sizes (tome.py),
  num_prefix: int = 0  # protecting the cls token if there is one.
  head_dim: int | None = None  # None: hidden // num_heads (head_counts.py).

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool,
               drop_path_rate: Any = 0.0, size: jax.Array | None = None
               ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """inputs: [batch, tokens, hidden] -> same shape; given sizes [batch, tokens,
    1] (ToMe), merges tome_r tokens before the MLP and returns (x, size)."""
    activations = get_policy(self.precision).activation_dtype
    x = nn.LayerNorm(epsilon=1e-6, dtype=activations, name='LayerNorm_0')(inputs)
    x = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate,
        precision=self.precision, impl=self.attention_impl, head_dim=self.head_dim,
        favor_features=self.favor_features, favor_kernel=self.favor_kernel,
        favor_seed=self.favor_seed, name='MultiHeadDotProductAttention_1')(
            x, x, deterministic=deterministic, return_key_mean=size is not None,
            bias=None if size is None else tome.size_bias(size))
    x, keys = x if size is not None else (x, None)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = DropPath()(x, drop_path_rate, deterministic=deterministic) + inputs
    if size is not None:
      x, size = tome.merge_tokens(x, size, keys, self.tome_r, self.num_prefix)

    y = nn.LayerNorm(epsilon=1e-6, dtype=activations, name='LayerNorm_2')(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.precision,
                 self.gelu_approximate, name='MlpBlock_3')(
                     y, deterministic=deterministic)
    x = x + DropPath()(y, drop_path_rate, deterministic=deterministic)
    return x if size is None else (x, size)


class Encoder(nn.Module):
  """Position embedding, dropout, `num_layers` blocks and the final `encoder_norm`.

  Stochastic depth grows linearly with depth, from 0 at the first block to
  `stochastic_depth` at the last. With `scan_layers` the blocks are one
  `Transformer/encoderblock` whose params carry a leading [num_layers] axis;
  each layer gets its own dropout randomness (split rngs), its own rate
  (scanned input), and sown intermediates stacked the same way
  (`encoderblock/MultiHeadDotProductAttention_1/attention_weights`:
  [num_layers, batch, heads, q, k]).

  `token_mixer` picks the block (Encoder1DBlock for 'attention', FourierBlock
  otherwise); `block_options` are the remaining fields of that block. With
  their `tome_r` > 0 (ToMe, tome.py) it returns (x, size [batch, tokens, 1]).
  """
  num_layers: int
  mlp_dim: int
  dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  posemb: str = 'learn'
  precision: str = 'float32'  # A precision.POLICIES name.
  scan_layers: bool = False
  remat_policy: str = 'none'
  token_mixer: str = 'attention'
  block_options: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, *, grid: tuple[int, int], num_prefix: int,
               deterministic: bool) -> jax.Array | tuple[jax.Array, jax.Array]:
    """x: [batch, num_prefix + grid_h * grid_w, hidden] -> same shape."""
    if self.posemb == 'learn':
      x = AddPositionEmbs(name='posembed_input')(x)
    elif self.posemb == 'sincos2d':
      pe = posemb_sincos_2d(*grid, x.shape[-1])
      pe = np.pad(pe, ((0, 0), (num_prefix, 0), (0, 0)))  # prefix tokens get none
      x = x + jnp.asarray(pe, x.dtype)
    else:
      raise ValueError(f'posemb {self.posemb!r} not in {POSEMBS}')
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)

    rates = [self.stochastic_depth * i / max(self.num_layers - 1, 1)
             for i in range(self.num_layers)]
    # A rate that is a traced scan input cannot be static under remat.
    traced_rates = self.scan_layers and self.stochastic_depth > 0
    block = self._block_class(static_rate=not traced_rates)
    config = dict(self.block_options or {}, mlp_dim=self.mlp_dim,
                  dropout_rate=self.dropout_rate, precision=self.precision)
    tome_r = config.pop('tome_r', 0)
    size = jnp.ones(x.shape[:2] + (1,), jnp.float32) if tome_r else None
    if self.token_mixer != 'attention':
      config.update(grid=tuple(grid), token_mixer=self.token_mixer)
    if self.scan_layers:
      def body(module: nn.Module, carry: jax.Array, rate: jax.Array):
        return module(carry, deterministic, rate if traced_rates else 0.0), None
      scan = nn.scan(
          body, variable_axes={'params': 0, 'intermediates': 0},
          split_rngs={'params': True, 'dropout': True, 'favor': True},
          in_axes=0, length=self.num_layers)
      x, _ = scan(block(**config, name='encoderblock'), x,
                  jnp.asarray(rates, jnp.float32))
    else:
      merges = tome.merge_schedule(tome_r, x.shape[1], num_prefix, self.num_layers)
      for i, (rate, r) in enumerate(zip(rates, merges)):
        tome_fields = dict(tome_r=r, num_prefix=num_prefix) if tome_r else {}
        layer = block(**head_counts.block_fields(config, i), **tome_fields,
                      name=f'encoderblock_{i}')
        if size is None:
          x = layer(x, deterministic, rate)
        else:
          x, size = layer(x, deterministic, rate, size)
    x = nn.LayerNorm(epsilon=1e-6, dtype=get_policy(self.precision).activation_dtype,
                     name='encoder_norm')(x)
    return x if size is None else (x, size)

  def _block_class(self, *, static_rate: bool) -> type[nn.Module]:
    """The mixer's block, wrapped in `nn.remat` with the configured policy."""
    policy = check_remat_policy(self.remat_policy)
    block = Encoder1DBlock if self.token_mixer == 'attention' else FourierBlock
    if self.remat_policy == 'none':
      return block
    # Argument 0 is the module: 1 inputs, 2 deterministic, 3 drop_path_rate
    # (4, ToMe's token sizes, is traced).
    return nn.remat(block, policy=policy,
                    static_argnums=(2, 3) if static_rate else (2,),
                    # Inside a scan XLA cannot fold the recomputation back into
                    # the forward pass, so the CSE barrier is only a cost there.
                    prevent_cse=not self.scan_layers)


class PatchEmbedding(nn.Module):
  """Non-overlapping patches -> `hidden_size` features, [b, h/ph, w/pw, hidden].

  The parameters are those of a stride-`patch_size` VALID `nn.Conv` (kernel
  [ph, pw, channels, hidden], bias [hidden], same init), as in the released
  files, but the product is one matmul over flattened patches: on XLA CPU the
  conv's backward pass costs about twice the matmul's, and it is the same sum.
  """
  hidden_size: int
  patch_size: tuple[int, int]
  precision: str = 'float32'  # A precision.POLICIES name.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.patch_size
    batch, height, width, channels = x.shape
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (ph, pw, channels, self.hidden_size))
    bias = self.param('bias', nn.initializers.zeros, (self.hidden_size,))
    gh, gw = height // ph, width // pw
    patches = x.reshape(batch, gh, ph, gw, pw, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(
        batch, gh, gw, ph * pw * channels)
    # promote_dtype, not astype: int8 quantization (vit_jax.quantization)
    # intercepts it, and the matmul, to use the int8 kernel.
    policy = get_policy(self.precision)
    patches, kernel, bias = promote_dtype(patches, kernel, bias,
                                          dtype=policy.activation_dtype)
    kernel = kernel.reshape(ph * pw * channels, self.hidden_size)
    return policy.matmul(patches, kernel) + bias


class VisionTransformer(nn.Module):
  """ViT: patch embedding -> [cls +] tokens -> Encoder -> pooling -> head.

  Input images are NHWC in [-1, 1]. Output: logits [batch, num_classes] (float32),
  or pooled features when `num_classes` is None; per-token outputs for the
  `unpooled` classifiers.
  """
  num_classes: int | None
  patch_size: Sequence[int]
  hidden_size: int
  num_layers: int
  num_heads: int | tuple[int, ...]  # Or one per block (head_counts.py).
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  classifier: str = 'token'
  representation_size: int | None = None
  posemb: str = 'learn'
  head_bias_init: float = 0.0
  resnet: Any | None = None  # resnet_stem kwargs: num_layers, width_factor.
  conv_stem: Sequence[int] = ()      # ConvStem widths (3x3/2 convs); () = none.
  conv_stem_depth: int = 1           # 3x3 layers per ConvStem stage (1 at stride 2).
  precision: str = 'float32'  # A precision.POLICIES name.
  attention_impl: str = 'xla'
  scan_layers: bool = False          # Encoder blocks as one nn.scan (see Encoder).
  remat_policy: str = 'none'         # One of REMAT_POLICIES.
  token_mixer: str = 'attention'     # One of TOKEN_MIXERS.
  gelu_approximate: bool = True      # tanh GELU (released ViTs); False: erf.
  favor_features: int = 256          # FAVOR+ (attention_impl='favor') settings,
  favor_kernel: str = 'positive'     # see vit_jax.models.favor.
  favor_seed: int = 0
  afno_num_blocks: int = 8           # AFNO (token_mixer='afno') settings, see
  afno_sparsity_threshold: float = 0.01        # vit_jax.models.fourier.AFNO2D.
  afno_hard_thresholding_fraction: float = 1.0
  afno_hidden_size_factor: int = 1
  afno_double_skip: bool = True
  tome_r: int = 0                    # ToMe: tokens merged per block (tome.py).
  head_dim: int | None = None        # None: hidden_size // num_heads.

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'classifier {self.classifier!r} not in {CLASSIFIERS}')
    if self.resnet is not None and self.conv_stem:
      raise ValueError('a ViT takes a resnet stem or a conv_stem, not both')
    check_mixer(self)
    policy = get_policy(self.precision)
    x = images.astype(policy.activation_dtype)
    if self.resnet is not None:
      x = resnet_stem(x, **dict(self.resnet), precision=self.precision)
    if self.conv_stem:
      x = ConvStem(tuple(self.conv_stem), self.conv_stem_depth, self.precision,
                   name='conv_stem')(x)
    ph, pw = self.patch_size
    if x.shape[1] % ph or x.shape[2] % pw:
      stem = ('' if x.shape[1:3] == images.shape[1:3] else
              f' (the stem turned it into {tuple(x.shape[1:3])})')
      raise ValueError(
          f'image size {tuple(images.shape[1:3])}{stem} is not divisible by the '
          f'patch size {tuple(self.patch_size)}')
    x = PatchEmbedding(self.hidden_size, (ph, pw), self.precision,
                       name='embedding')(x)
    batch, gh, gw, hidden = x.shape
    x = x.reshape(batch, gh * gw, hidden)

    num_prefix = 0
    if self.classifier in ('token', 'token_unpooled'):
      cls = self.param('cls', nn.initializers.zeros, (1, 1, hidden))
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (batch, 1, 1)), x], 1)
      num_prefix = 1

    x = Encoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate,
        stochastic_depth=self.stochastic_depth, posemb=self.posemb,
        precision=self.precision, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, token_mixer=self.token_mixer,
        block_options=block_options(self), name='Transformer')(x, grid=(gh, gw), num_prefix=num_prefix,
                            deterministic=not train)
    x, size = x if self.tome_r else (x, None)  # Merged tokens' patch counts.

    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(x, axis=1) if size is None else tome.weighted_mean(x, size)
    elif self.classifier == 'map':
      x = MAPHead(head_counts.pooling_heads(self), self.mlp_dim, self.precision,
                  name='MAPHead_0')(x, None if size is None else tome.size_bias(size))

    if self.representation_size is not None:
      x = nn.tanh(nn.Dense(self.representation_size, dtype=policy.activation_dtype,
                           dot_general=policy.dot_general, name='pre_logits')(x))
    if self.num_classes is not None:
      x = nn.Dense(self.num_classes, dtype=policy.activation_dtype,
                   dot_general=policy.dot_general, name='head',
                   kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.constant(self.head_bias_init))(x)
    return x.astype(jnp.float32)


def check_mixer(vit: Any) -> None:
  """Raises ValueError for token-mixer settings of a ViT (Module or ConfigDict)
  that cannot build: checked by the registry before anything is traced."""
  check_token_mixer(vit.token_mixer, vit.classifier)
  tome.check_tome(vit)
  head_counts.check_heads(vit)
  if vit.token_mixer == 'attention':
    check_attention(vit.attention_impl, vit.attention_dropout_rate,
                    vit.favor_features, vit.favor_kernel)
  elif vit.token_mixer == 'afno':
    check_afno(vit.hidden_size, vit.afno_num_blocks, vit.afno_hidden_size_factor,
               vit.afno_hard_thresholding_fraction, vit.afno_sparsity_threshold)


def block_options(vit: Any) -> dict[str, Any]:
  """Fields of the encoder block that `vit.token_mixer` selects, beyond the
  ones every block takes (mlp_dim, dropout_rate, precision)."""
  options = dict(gelu_approximate=vit.gelu_approximate)
  if vit.token_mixer == 'attention':
    options.update(
        num_heads=vit.num_heads, head_dim=getattr(vit, 'head_dim', None),
        attention_dropout_rate=vit.attention_dropout_rate,
        attention_impl=vit.attention_impl, favor_features=vit.favor_features,
        favor_kernel=vit.favor_kernel, favor_seed=vit.favor_seed,
        tome_r=getattr(vit, 'tome_r', 0))
  elif vit.token_mixer == 'afno':
    options.update({k: getattr(vit, k) for k in (
        'afno_num_blocks', 'afno_sparsity_threshold',
        'afno_hard_thresholding_fraction', 'afno_hidden_size_factor',
        'afno_double_skip')})
  return options
