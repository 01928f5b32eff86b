"""Convolutional stem for ViT ("Early convolutions help transformers see better").

Xiao et al. (2021) replace the ViT's patchify layer by a few 3x3 stride-2
convolutions and a final 1x1 convolution to the hidden size; the transformer
then sees tokens that already carry local structure, so it learns more per
image and is less sensitive to the optimiser's settings. Here the stem is the
stack of stride-2 convolutions; the final 1x1 convolution is the ViT's own
`embedding` (a patch embedding with patch size 1x1, or larger to merge stem
outputs), so every parameter above the stem keeps its usual name.

Each stage is conv 3x3 / stride 2 (SAME padding, no bias) -> LayerNorm over
channels -> ReLU, then `depth - 1` more such layers at stride 1 and the same
width. On small images (28 px Fashion-MNIST) those stride-1 layers are where a
small CNN gets its accuracy: they see the 14 and 7 px maps at full detail
before the next stage halves them. The paper uses BatchNorm; LayerNorm keeps
the model free of batch statistics, so the train step, sharding and
checkpoints stay what they are for every other model. A stage maps a side of
n pixels to ceil(n / 2), so a 28 px image becomes 14, 7, 4 after three
stages. Parameters:
`conv_stem/conv_{i}/kernel` [3, 3, in, out] (an `nn.Conv` kernel) and
`conv_stem/norm_{i}/{scale,bias}` for the stride-2 layer of stage i (so a
depth-1 stem keeps the names it always had), `conv_stem/conv_{i}_{j}` and
`conv_stem/norm_{i}_{j}` for its stride-1 layers, j = 1 .. depth - 1.
"""

import math
from typing import Sequence

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp

from vit_jax.models.precision import get_policy


def conv3x3(x: jax.Array, kernel: jax.Array, stride: int,
            precision: str = 'float32') -> jax.Array:
  """SAME 3x3 convolution, [b, h, w, c] x [3, 3, c, o] -> [b, h/stride, w/stride, o].

  Computed as nine strided slices and one matmul over their concatenation
  (im2col). It is exactly `lax.conv_general_dilated(x, kernel, (s, s), 'SAME')`
  (tested), and XLA CPU runs the wider stages' forward and backward faster
  than its own conv (docs/benchmarks.md, "Measurements behind choices").
  """
  batch, height, width, channels = x.shape
  out_h, out_w = _out_side(height, stride), _out_side(width, stride)
  pad_h = max(stride * (out_h - 1) + 3 - height, 0)
  pad_w = max(stride * (out_w - 1) + 3 - width, 0)
  x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                  (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
  columns = [x[:, dy:dy + stride * (out_h - 1) + 1:stride,
               dx:dx + stride * (out_w - 1) + 1:stride, :]
             for dy in range(3) for dx in range(3)]
  patches = jnp.concatenate(columns, axis=-1)  # [b, h', w', 9 * c], (dy, dx, c) order
  return get_policy(precision).matmul(
      patches, kernel.reshape(9 * channels, kernel.shape[-1]))


def _out_side(size: int, stride: int) -> int:
  """SAME padding: a side of `size` pixels becomes ceil(size / stride)."""
  return math.ceil(size / stride)


class Conv3x3(nn.Module):
  """`conv3x3` with an `nn.Conv`'s kernel (lecun-normal, no bias)."""
  features: int
  stride: int
  precision: str = 'float32'  # A precision.POLICIES name.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features))
    # promote_dtype, not astype: int8 quantization (vit_jax.quantization)
    # intercepts it, and conv3x3's matmul, to use the int8 kernel.
    x, kernel = promote_dtype(
        x, kernel, dtype=get_policy(self.precision).activation_dtype)
    return conv3x3(x, kernel, self.stride, self.precision)


class ConvStem(nn.Module):
  """`len(widths)` stages: [b, h, w, c] -> [b, ~h/2^n, ~w/2^n, widths[-1]].

  Attributes:
    widths: output channels of each stage, in order.
    depth: 3x3 layers per stage: one at stride 2, then `depth - 1` at stride 1.
    precision: a precision.POLICIES name; parameters stay float32.
  """
  widths: Sequence[int]
  depth: int = 1
  precision: str = 'float32'  # A precision.POLICIES name.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.depth < 1:
      raise ValueError(f'conv_stem_depth must be >= 1, got {self.depth}')
    activations = get_policy(self.precision).activation_dtype
    for i, width in enumerate(self.widths):
      for j in range(self.depth):
        suffix = f'{i}_{j}' if j else f'{i}'
        x = Conv3x3(width, 1 if j else 2, self.precision, name=f'conv_{suffix}')(x)
        x = nn.LayerNorm(epsilon=1e-6, dtype=activations, name=f'norm_{suffix}')(x)
        x = nn.relu(x)
    return x


def conv_stem_grid(size: int, num_stages: int) -> int:
  """Side of the stem's output for an input side of `size` pixels."""
  for _ in range(num_stages):
    size = _out_side(size, 2)
  return size
