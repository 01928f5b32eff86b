"""Fourier token mixers: GFNet's global filter and AFNO, with their encoder blocks.

Both mix tokens in the 2-D frequency domain of the patch grid instead of with
attention: rfft2 over (grid_h, grid_w), a learned operation per frequency, and
irfft2 back (norm='ortho' both ways, as the official code does). Tokens must
therefore *be* the grid: there is no cls token, and pooling is gap or map.

- GFNet (Rao et al., NeurIPS 2021; raoyongming/GFNet `gfnet.py`): an
  elementwise complex filter per frequency and channel, stored as the official
  code stores it, a real float32 `complex_weight` [h, w//2+1, hidden, 2]
  (real, imaginary), so parameter counts equal the official model's. Its block
  has one residual: x + MLP(LN(GlobalFilter(LN(x)))).
- AFNO (Guibas et al., ICLR 2022; NVlabs/AFNO-transformer `afno/afno2d.py`): a
  block-diagonal complex two-layer MLP shared by all frequencies (ReLU on the
  real and imaginary parts), soft-shrinkage, optional truncation of the highest
  frequencies along the rfft axis; the layer returns F(u) + u. With
  `double_skip` (the reference's default) the block is y = x + AFNO(LN(x)),
  out = y + MLP(LN(y)); without it, out = x + MLP(LN(AFNO(LN(x)))).

FFTs always run in float32 (`jnp.fft.rfft2` refuses bf16), and so do AFNO's
complex products under every precision policy: the mixers cast in and back out
to the policy's activation dtype, so the rest of a bf16 model stays bf16.

Module names follow the ViT block (`LayerNorm_0`, `<mixer>_1`, `LayerNorm_2`,
`MlpBlock_3`) under `Transformer/encoderblock_{i}`, so position-embedding
resizing, layer-wise rules, sharding, scanning and export treat these models
like any ViT.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models.layers import DropPath
from vit_jax.models.layers import MlpBlock
from vit_jax.models.precision import get_policy

Dtype = Any


def check_grid(num_tokens: int, grid: tuple[int, int]) -> None:
  """Raises ValueError unless `num_tokens` tokens are exactly the `grid`."""
  gh, gw = grid
  if gh < 1 or gw < 1 or num_tokens != gh * gw:
    raise ValueError(
        f'a Fourier token mixer needs the tokens to be the patch grid: got '
        f'{num_tokens} tokens for a {gh}x{gw} grid (a cls token or merged '
        f'tokens have no place in the frequency grid; use gap or map pooling)')


def check_afno(hidden_size: int, num_blocks: int, hidden_size_factor: int,
               hard_thresholding_fraction: float,
               sparsity_threshold: float) -> None:
  """Raises ValueError for AFNO settings that cannot build the layer."""
  if num_blocks < 1 or hidden_size % num_blocks:
    raise ValueError(f'AFNO hidden size {hidden_size} is not divisible by '
                     f'afno_num_blocks {num_blocks}')
  if hidden_size_factor < 1:
    raise ValueError(
        f'afno_hidden_size_factor must be >= 1, got {hidden_size_factor}')
  if not 0.0 < hard_thresholding_fraction <= 1.0:
    raise ValueError('afno_hard_thresholding_fraction must be in (0, 1], got '
                     f'{hard_thresholding_fraction}')
  if sparsity_threshold < 0:
    raise ValueError(
        f'afno_sparsity_threshold must be >= 0, got {sparsity_threshold}')


def _to_frequencies(x: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """[batch, tokens, c] -> complex64 [batch, gh, gw//2+1, c] (float32 FFT)."""
  check_grid(x.shape[1], grid)
  x = x.astype(jnp.float32).reshape(x.shape[0], *grid, x.shape[-1])
  return jnp.fft.rfft2(x, axes=(1, 2), norm='ortho')


def _to_tokens(f: jax.Array, grid: tuple[int, int], dtype: Dtype) -> jax.Array:
  """Inverse of `_to_frequencies`: complex grid -> [batch, tokens, c] in `dtype`."""
  x = jnp.fft.irfft2(f, s=grid, axes=(1, 2), norm='ortho')
  return x.reshape(x.shape[0], grid[0] * grid[1], x.shape[-1]).astype(dtype)


class GlobalFilter(nn.Module):
  """irfft2(rfft2(x) * W): one learned complex weight per frequency and channel."""
  grid: tuple[int, int]
  precision: str = 'float32'  # A precision.POLICIES name.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, grid_h * grid_w, c] -> same shape, in the policy's activation dtype."""
    gh, gw = self.grid
    weight = self.param('complex_weight', nn.initializers.normal(stddev=0.02),
                        (gh, gw // 2 + 1, x.shape[-1], 2), jnp.float32)
    f = _to_frequencies(x, self.grid)
    return _to_tokens(f * jax.lax.complex(weight[..., 0], weight[..., 1]),
                      self.grid, get_policy(self.precision).activation_dtype)


class AFNO2D(nn.Module):
  """Adaptive Fourier neural operator layer; returns F(x) + x.

  Weights (init 0.02 * N(0, 1), as the reference): w1 [2, k, d/k, d/k*f],
  b1 [2, k, d/k*f], w2 [2, k, d/k*f, d/k], b2 [2, k, d/k], the leading axis
  holding (real, imaginary) of a complex block-diagonal MLP over channels.
  Frequencies past `hard_thresholding_fraction` of the rfft axis are zeroed.
  """
  grid: tuple[int, int]
  num_blocks: int = 8
  sparsity_threshold: float = 0.01
  hard_thresholding_fraction: float = 1.0
  hidden_size_factor: int = 1
  precision: str = 'float32'  # A precision.POLICIES name.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, grid_h * grid_w, c] -> same shape, in the policy's activation dtype."""
    hidden = x.shape[-1]
    check_afno(hidden, self.num_blocks, self.hidden_size_factor,
               self.hard_thresholding_fraction, self.sparsity_threshold)
    k = self.num_blocks
    size = hidden // k
    wide = size * self.hidden_size_factor
    init = nn.initializers.normal(stddev=0.02)
    complex_param = lambda name, shape: (lambda p: jax.lax.complex(p[0], p[1]))(
        self.param(name, init, (2, *shape), jnp.float32))
    w1 = complex_param('w1', (k, size, wide))
    b1 = complex_param('b1', (k, wide))
    w2 = complex_param('w2', (k, wide, size))
    b2 = complex_param('b2', (k, size))

    f = _to_frequencies(x, self.grid)
    batch, fh, fw, _ = f.shape
    kept = int(fw * self.hard_thresholding_fraction)
    f = f[:, :, :kept].reshape(batch, fh, kept, k, size)
    relu = lambda z: jax.lax.complex(nn.relu(z.real), nn.relu(z.imag))
    h = relu(jnp.einsum('...bi,bio->...bo', f, w1) + b1)
    f = jnp.einsum('...bi,bio->...bo', h, w2) + b2
    shrink = lambda v: jnp.sign(v) * nn.relu(jnp.abs(v) - self.sparsity_threshold)
    f = jax.lax.complex(shrink(f.real), shrink(f.imag)).reshape(
        batch, fh, kept, hidden)
    f = jnp.pad(f, ((0, 0), (0, 0), (0, fw - kept), (0, 0)))
    activations = get_policy(self.precision).activation_dtype
    return _to_tokens(f, self.grid, activations) + x.astype(activations)


class FourierBlock(nn.Module):
  """Encoder block whose token mixer is a global filter or an AFNO layer.

  Same call signature as the attention block (`Encoder1DBlock`), so the
  encoder can scan, remat and drop paths over either. Dropout follows the
  references: inside the MLP only; stochastic depth on the MLP branch.
  """
  mlp_dim: int
  grid: tuple[int, int]
  token_mixer: str = 'global_filter'  # or 'afno'
  dropout_rate: float = 0.0
  precision: str = 'float32'  # A precision.POLICIES name.
  gelu_approximate: bool = True
  afno_num_blocks: int = 8
  afno_sparsity_threshold: float = 0.01
  afno_hard_thresholding_fraction: float = 1.0
  afno_hidden_size_factor: int = 1
  afno_double_skip: bool = True

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool,
               drop_path_rate: Any = 0.0) -> jax.Array:
    """inputs: [batch, grid_h * grid_w, hidden] -> same shape."""
    activations = get_policy(self.precision).activation_dtype
    x = nn.LayerNorm(epsilon=1e-6, dtype=activations, name='LayerNorm_0')(inputs)
    if self.token_mixer == 'global_filter':
      x = GlobalFilter(self.grid, self.precision, name='GlobalFilter_1')(x)
      residual = inputs
    elif self.token_mixer == 'afno':
      x = AFNO2D(self.grid, self.afno_num_blocks, self.afno_sparsity_threshold,
                 self.afno_hard_thresholding_fraction,
                 self.afno_hidden_size_factor, self.precision, name='AFNO2D_1')(x)
      if self.afno_double_skip:
        x = x + inputs
        residual = x
      else:
        residual = inputs
    else:
      raise ValueError(f'FourierBlock token_mixer {self.token_mixer!r} is not '
                       "'global_filter' or 'afno'")
    y = nn.LayerNorm(epsilon=1e-6, dtype=activations, name='LayerNorm_2')(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.precision,
                 self.gelu_approximate, name='MlpBlock_3')(
                     y, deterministic=deterministic)
    return residual + DropPath()(y, drop_path_rate, deterministic=deterministic)
