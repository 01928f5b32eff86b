"""Convolutional stem for ViT ("Early convolutions help transformers see better").

Xiao et al. (2021) replace the ViT's patchify layer by a few 3x3 stride-2
convolutions and a final 1x1 convolution to the hidden size; the transformer
then sees tokens that already carry local structure, so it learns more per
image and is less sensitive to the optimiser's settings. Here the stem is the
stack of stride-2 convolutions; the final 1x1 convolution is the ViT's own
`embedding` (a patch embedding with patch size 1x1, or larger to merge stem
outputs), so every parameter above the stem keeps its usual name.

Each stage is conv 3x3 / stride 2 (SAME padding, no bias) -> LayerNorm over
channels -> ReLU. The paper uses BatchNorm; LayerNorm keeps the model free of
batch statistics, so the train step, sharding and checkpoints stay what they
are for every other model. A stage maps a side of n pixels to ceil(n / 2), so
a 28 px image becomes 14, 7, 4 after three stages. Parameters:
`conv_stem/conv_{i}/kernel` [3, 3, in, out] (an `nn.Conv` kernel) and
`conv_stem/norm_{i}/{scale,bias}`.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def conv3x3_stride2(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """SAME 3x3 / stride-2 convolution, [b, h, w, c] x [3, 3, c, o] -> [b, h', w', o].

  Computed as nine strided slices and one matmul over their concatenation
  (im2col). It is exactly `lax.conv_general_dilated(x, kernel, (2, 2), 'SAME')`
  (tested), but XLA CPU runs it faster: forward + backward of a 32->64-channel
  stage at batch 128 took 9.5 ms against the conv's 21.7 ms (measured here);
  stages with few channels are about even.
  """
  batch, height, width, channels = x.shape
  out_h, out_w = -(-height // 2), -(-width // 2)
  pad_h = max(2 * (out_h - 1) + 3 - height, 0)
  pad_w = max(2 * (out_w - 1) + 3 - width, 0)
  x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                  (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
  columns = [x[:, dy:dy + 2 * out_h - 1:2, dx:dx + 2 * out_w - 1:2, :]
             for dy in range(3) for dx in range(3)]
  patches = jnp.concatenate(columns, axis=-1)  # [b, h', w', 9 * c], (dy, dx, c) order
  return patches @ kernel.reshape(9 * channels, kernel.shape[-1])


class StridedConv3x3(nn.Module):
  """`conv3x3_stride2` with an `nn.Conv`'s kernel (lecun-normal, no bias)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features))
    return conv3x3_stride2(x.astype(self.dtype), kernel.astype(self.dtype))


class ConvStem(nn.Module):
  """`len(widths)` stride-2 stages: [b, h, w, c] -> [b, ~h/2^n, ~w/2^n, widths[-1]].

  Attributes:
    widths: output channels of each 3x3 stride-2 convolution, in order.
    dtype: compute dtype; parameters stay float32.
  """
  widths: Sequence[int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, width in enumerate(self.widths):
      x = StridedConv3x3(width, self.dtype, name=f'conv_{i}')(x)
      x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=f'norm_{i}')(x)
      x = nn.relu(x)
    return x


def conv_stem_grid(size: int, num_stages: int) -> int:
  """Side of the stem's output for an input side of `size` pixels."""
  for _ in range(num_stages):
    size = math.ceil(size / 2)
  return size
