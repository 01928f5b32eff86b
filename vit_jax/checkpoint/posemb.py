"""Resizes grid-shaped parameters to a new patch grid: learned position
embeddings, and GFNet's global filters (`resize_global_filter`).

Fine-tuning at a higher resolution than pre-training (224 px -> 384 px) gives
more patches, so a released `pos_embedding` of shape [1, prefix + gh*gw, D] has
to become [1, prefix + nh*nw, D]. The prefix rows (the cls token) are not tied
to a grid position and are kept unchanged; the grid rows are reshaped to
[gh, gw, D] and interpolated spatially.

Two conventions exist and give different numbers, so both are offered:

- `'linear'` (default): google-research/vision_transformer's, a first-order
  spline through `scipy.ndimage.zoom(grid, (nh/gh, nw/gw, 1), order=1)`, which
  maps the corner samples of the old grid onto the corner samples of the new.
- `'bicubic'`: timm's, i.e. torch `F.interpolate(mode='bicubic',
  align_corners=False, antialias=False)`: half-pixel centres, the cubic
  convolution kernel with a = -0.75 and replicated borders. `jax.image.resize`
  is not used because its cubic kernel is Keys' a = -0.5 and it renormalises
  weights at the border instead of replicating the edge, so it would not match
  timm (e.g. [0, 1] -> 4 samples: torch 0.2266 at index 1, jax 0.2071). For
  downsampling, timm's newer `resample_abs_pos_embed` defaults to
  antialias=True, which this does not reproduce; upsampling is identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.ndimage

# Cubic convolution coefficient used by torch (and therefore timm).
_TORCH_CUBIC_A = -0.75
METHODS = ('linear', 'bicubic')


def resize_posemb(
    posemb: np.ndarray,
    new_num_tokens_or_grid: int | Sequence[int],
    *,
    num_prefix_tokens: int,
    method: str = 'linear',
    old_grid: Sequence[int] | None = None,
) -> np.ndarray:
  """Returns `posemb` resized to a new patch grid.

  Args:
    posemb: [1, num_prefix_tokens + gh*gw, D] position embedding.
    new_num_tokens_or_grid: either the new total token count (prefix included,
      i.e. the target's `posemb.shape[1]`; the new grid must then be square) or
      the new grid as (nh, nw).
    num_prefix_tokens: leading rows that are not on the grid (1 for a cls
      token, 0 for gap/map pooling). They are copied unchanged.
    method: 'linear' (the reference's scipy zoom, order 1, corner to corner) or
      'bicubic' (timm's torch bicubic, half-pixel centres, a = -0.75).
    old_grid: (gh, gw) of `posemb` when it is not square; inferred as square
      otherwise.

  Returns:
    [1, num_prefix_tokens + nh*nw, D] array with the dtype of `posemb`. When
    the grid does not change, an exact copy of `posemb`.
  """
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(
        f'posemb must have shape [1, tokens, D], got {posemb.shape}.')
  if not 0 <= num_prefix_tokens <= posemb.shape[1]:
    raise ValueError(f'num_prefix_tokens={num_prefix_tokens} does not fit a '
                     f'posemb of shape {posemb.shape}.')
  prefix = posemb[:, :num_prefix_tokens]
  grid = posemb[0, num_prefix_tokens:]
  num_old = grid.shape[0]

  if old_grid is None:
    gh, gw = _square_grid(num_old, 'old', 'old_grid')
  else:
    gh, gw = (int(s) for s in old_grid)
    if gh * gw != num_old:
      raise ValueError(f'old_grid {(gh, gw)} has {gh * gw} positions but '
                       f'posemb has {num_old} grid rows.')
  if isinstance(new_num_tokens_or_grid, (int, np.integer)):
    nh, nw = _square_grid(int(new_num_tokens_or_grid) - num_prefix_tokens,
                          'new', '(nh, nw) as new_num_tokens_or_grid')
  else:
    nh, nw = (int(s) for s in new_num_tokens_or_grid)
  if nh <= 0 or nw <= 0:
    raise ValueError(f'New grid must be positive, got {(nh, nw)}.')

  if (nh, nw) == (gh, gw):
    return posemb.copy()

  grid = grid.reshape(gh, gw, -1).astype(np.float64)
  if method == 'linear':
    new_grid = scipy.ndimage.zoom(grid, (nh / gh, nw / gw, 1), order=1)
    if new_grid.shape[:2] != (nh, nw):  # scipy rounds the output size.
      raise AssertionError(f'zoom gave {new_grid.shape[:2]}, want {(nh, nw)}')
  elif method == 'bicubic':
    rows = torch_bicubic_matrix(gh, nh)
    cols = torch_bicubic_matrix(gw, nw)
    new_grid = np.einsum('ih,jw,hwd->ijd', rows, cols, grid)
  else:
    raise ValueError(f"Unknown posemb resize method {method!r}; "
                     "use 'linear' or 'bicubic'.")
  new_grid = new_grid.reshape(1, nh * nw, -1).astype(posemb.dtype)
  return np.concatenate([prefix, new_grid], axis=1)


def resize_global_filter(weight: np.ndarray, new_grid: Sequence[int]) -> np.ndarray:
  """A GFNet `complex_weight` [h, w//2+1, c, 2] for the patch grid `new_grid`.

  The official fine-tuning code (raoyongming/GFNet main_gfnet.py) resizes the
  filter as an image over its two frequency axes: torch bicubic with
  align_corners=True, to [nh, nw//2+1]. Done the same way here, so a resized
  official filter gives the official numbers. (It treats the FFT-ordered
  frequency axis as if it were spatial, as the official code does.)
  """
  weight = np.asarray(weight)
  if weight.ndim != 4 or weight.shape[-1] != 2:
    raise ValueError(f'a global filter weight is [h, w//2+1, c, 2], got {weight.shape}')
  nh, nw = (int(s) for s in new_grid)
  shape = (nh, nw // 2 + 1)
  if weight.shape[:2] == shape:
    return weight.copy()
  rows = torch_bicubic_matrix(weight.shape[0], shape[0], align_corners=True)
  cols = torch_bicubic_matrix(weight.shape[1], shape[1], align_corners=True)
  new = np.einsum('ih,jw,hw...->ij...', rows, cols, weight.astype(np.float64))
  return new.astype(weight.dtype)


def torch_bicubic_matrix(n_in: int, n_out: int, *,
                         align_corners: bool = False) -> np.ndarray:
  """[n_out, n_in] weights of torch's 1-D bicubic resize.

  Output sample i reads source coordinate (i + 0.5) * n_in / n_out - 0.5 (half
  pixel centres, not clamped; with `align_corners`, i * (n_in - 1) /
  (n_out - 1), corner to corner), and combines the 4 nearest source samples
  with the cubic convolution kernel (a = -0.75); out-of-range taps read the
  edge sample. Applying it on each spatial axis is torch's separable 2-D bicubic.
  """
  if align_corners:
    src = np.arange(n_out, dtype=np.float64) * (
        (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
  else:
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  base = np.floor(src)
  frac = src - base
  weights = np.zeros((n_out, n_in), np.float64)
  for offset in (-1, 0, 1, 2):
    distance = np.abs(frac - offset)
    index = np.clip(base.astype(np.int64) + offset, 0, n_in - 1)
    np.add.at(weights, (np.arange(n_out), index), _cubic_kernel(distance))
  return weights


def _cubic_kernel(x: np.ndarray, a: float = _TORCH_CUBIC_A) -> np.ndarray:
  """Cubic convolution kernel (Keys' form with free `a`) for |x| = `x` >= 0."""
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _square_grid(num: int, which: str, hint: str) -> tuple[int, int]:
  side = math.isqrt(max(num, 0))
  if side * side != num or num == 0:
    raise ValueError(f'The {which} grid has {num} positions, which is not a '
                     f'square; pass {hint} explicitly.')
  return side, side
