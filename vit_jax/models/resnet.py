"""ResNet (v2-style BiT units) stem for the hybrid R50+ViT / R26+ViT models.

Convolutions are weight-standardised ((w - mean) / (std + 1e-5)) and followed by GroupNorm with 32
groups (eps 1e-6), as in BiT; names follow the released hybrid checkpoints:
`conv_root`, `gn_root`, `block{n}/unit{m}/{conv1,conv2,conv3,conv_proj}`,
`block{n}/unit{m}/{gn1,gn2,gn3,gn_proj}`.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models.precision import Policy
from vit_jax.models.precision import get_policy


class StdConv(nn.Conv):
  """Conv whose kernel is standardised over its (h, w, in) axes before use."""

  def param(self, name: str, *args, **kwargs):
    value = super().param(name, *args, **kwargs)
    if name == 'kernel':
      # The reference's formula: eps added to the std, not to the variance
      # (timm's sqrt(var + eps) differs by ~5e-3 in the logits).
      value = value - jnp.mean(value, axis=(0, 1, 2), keepdims=True)
      value = value / (jnp.std(value, axis=(0, 1, 2), keepdims=True) + 1e-5)
    return value


def std_conv(features: int, kernel: tuple[int, int], strides: tuple[int, int],
             policy: Policy, name: str | None) -> StdConv:
  """A bias-free StdConv computing in `policy`."""
  return StdConv(features, kernel, strides, use_bias=False,
                 dtype=policy.activation_dtype,
                 conv_general_dilated=policy.conv_general_dilated, name=name)


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1 (x4), with a projection shortcut."""
  features: int
  strides: tuple[int, int] = (1, 1)
  precision: str = 'float32'  # A precision.POLICIES name.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    policy = get_policy(self.precision)
    conv = lambda features, kernel, strides=(1, 1), name=None: std_conv(
        features, kernel, strides, policy, name)
    norm = lambda name, **kw: nn.GroupNorm(
        num_groups=32, epsilon=1e-6, dtype=policy.activation_dtype, name=name, **kw)

    residual = x
    if x.shape[-1] != self.features * 4 or self.strides != (1, 1):
      residual = conv(self.features * 4, (1, 1), self.strides, 'conv_proj')(x)
      residual = norm('gn_proj')(residual)

    y = nn.relu(norm('gn1')(conv(self.features, (1, 1), name='conv1')(x)))
    y = nn.relu(norm('gn2')(conv(self.features, (3, 3), self.strides, 'conv2')(y)))
    y = conv(self.features * 4, (1, 1), name='conv3')(y)
    # Zero-initialised last norm: every unit starts as the identity.
    y = norm('gn3', scale_init=nn.initializers.zeros)(y)
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`block_size` residual units; the first one carries the stage's stride."""
  block_size: int
  features: int
  first_stride: tuple[int, int]
  precision: str = 'float32'  # A precision.POLICIES name.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = ResidualUnit(self.features, self.first_stride, self.precision, name='unit1')(x)
    for i in range(1, self.block_size):
      x = ResidualUnit(self.features, (1, 1), self.precision, name=f'unit{i + 1}')(x)
    return x


def resnet_stem(x: jax.Array, num_layers: Sequence[int], width_factor: float = 1,
                precision: str = 'float32') -> jax.Array:
  """Root conv (7x7/2) + max-pool (3x3/2) + stages; stride 4 * 2**(stages - 1).

  A function, not a Module: called inside the ViT's compact `__call__`, its
  submodules attach to the ViT itself, so their parameters sit at the top level of
  the tree (`conv_root`, `block1`, ...) exactly as in the released hybrid files.
  """
  width = int(64 * width_factor)
  policy = get_policy(precision)
  x = std_conv(width, (7, 7), (2, 2), policy, 'conv_root')(x)
  x = nn.relu(nn.GroupNorm(num_groups=32, epsilon=1e-6,
                           dtype=policy.activation_dtype,
                           name='gn_root')(x))
  x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
  for i, block_size in enumerate(num_layers):
    x = ResNetStage(block_size, width * 2**i, (1, 1) if i == 0 else (2, 2),
                    precision, name=f'block{i + 1}')(x)
  return x


def stem_stride(num_layers: Sequence[int]) -> int:
  """Total downsampling of ResNetStem with `len(num_layers)` stages."""
  return 4 * 2**(len(num_layers) - 1) if num_layers else 4
