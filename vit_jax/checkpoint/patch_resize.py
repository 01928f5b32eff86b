"""Loads a patch embedding trained at another patch size (FlexiViT's PI-resize).

A ViT's `embedding/kernel` w [ph, pw, c, d] turns one patch x [ph, pw, c] into
the token <x, w> (per output feature). A model with patches of another size
(ph', pw') sees, for the same image content resized by the same factor, the
patch B x, where B is the resize operator of one patch. FlexiViT (Beyer et al.,
"FlexiViT: One Model for All Patch Sizes", CVPR 2023, Sec. 3.4) picks the new
kernel w' that keeps the tokens: <B x, w'> = <x, w> for every x, i.e.
B^T w' = w. Its least-squares solution is w' = pinv(B^T) w (the
pseudo-inverse, 'pi'). When the new patch is larger (B injective) the identity
holds exactly; when it is smaller no kernel can keep every token, and w' is
the one whose B^T w' is the projection of w onto what the smaller patch can
express.

The operator B is `jax.image.resize(patch, (ph', pw'), method='bilinear',
antialias=False)` on each channel: half-pixel centres, a 2-tap triangle
kernel, a sample that falls past the edge taking the edge pixel. It is
separable, B = kron(R_h, R_w) with R the 1-D matrix of `bilinear_matrix`, so
pinv(B^T) = kron(pinv(R_h^T), pinv(R_w^T)) and each axis is solved alone. This
is what big_vision's FlexiViT code resizes with (TF2 `tf.image.resize`,
method 'bilinear', no antialiasing, which gives the same matrix) to match its
input pipeline. 'bilinear' instead resizes the kernel itself with B: it does
not keep the tokens (for a 2x larger patch they grow by about the area, 4x),
which is why FlexiViT found PI-resize the one that keeps a model's accuracy
when its patch size changes, and why 'pi' is the default.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# config.pretrained.patch_resize: what load_pretrained does with a patch
# embedding of another patch size. 'none' refuses it.
METHODS = ('pi', 'bilinear', 'none')
EMBEDDING_KEY = 'embedding/kernel'


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] float64 weights of the 1-D bilinear resize (see module doc).

  Output sample i reads source coordinate (i + 0.5) * n_in / n_out - 0.5,
  clamped to [0, n_in - 1], and interpolates linearly between its two
  neighbours: jax.image.resize's 'bilinear' with antialias=False (tested).
  """
  if n_in < 1 or n_out < 1:
    raise ValueError(f'sizes must be positive, got {n_in} -> {n_out}')
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  src = np.clip(src, 0.0, n_in - 1)
  low = np.floor(src).astype(np.int64)
  high = np.minimum(low + 1, n_in - 1)
  frac = src - low
  weights = np.zeros((n_out, n_in), np.float64)
  rows = np.arange(n_out)
  np.add.at(weights, (rows, low), 1.0 - frac)
  np.add.at(weights, (rows, high), frac)
  return weights


def resize_patch_kernel(kernel: np.ndarray, new_patch: Sequence[int],
                        method: str = 'pi') -> np.ndarray:
  """A patch-embedding kernel [ph, pw, c, d] for patches of `new_patch` (ph', pw').

  Args:
    kernel: the trained kernel (an `nn.Conv` kernel, HWIO).
    new_patch: the new patch's (height, width).
    method: 'pi' keeps every token of a patch resized by the module's operator
      B (exactly for a larger patch, least squares for a smaller one);
      'bilinear' resizes the kernel with B, which does not keep them.

  Returns:
    [ph', pw', c, d] in the kernel's dtype, computed in float64; an exact copy
    when the patch size does not change.
  """
  kernel = np.asarray(kernel)
  if kernel.ndim != 4:
    raise ValueError(f'a patch-embedding kernel is [ph, pw, c, d], got {kernel.shape}')
  new_h, new_w = (int(s) for s in new_patch)
  if (new_h, new_w) == kernel.shape[:2]:
    return kernel.copy()
  rows = bilinear_matrix(kernel.shape[0], new_h)
  cols = bilinear_matrix(kernel.shape[1], new_w)
  if method == 'pi':
    rows, cols = np.linalg.pinv(rows.T), np.linalg.pinv(cols.T)
  elif method != 'bilinear':
    raise ValueError(f'patch resize method {method!r} not in {METHODS[:2]}')
  new = np.einsum('ih,jw,hwcd->ijcd', rows, cols, kernel.astype(np.float64))
  return new.astype(kernel.dtype)


def load_patch_kernel(kernel: np.ndarray, model_shape: Sequence[int], *,
                      method: str, source: str, stem: str | None) -> np.ndarray:
  """`load_pretrained`'s step for a checkpoint `embedding/kernel` whose patch
  size differs from the model's (same channels and width): resized by `method`.

  Raises ValueError for method 'none' (naming both patch sizes and the key to
  set), and for a model with a stem (`stem` names it): its embedding reads the
  stem's feature map, not pixels, so resizing its patches is not FlexiViT's
  identity (FlexiViT resizes pixel patches only).
  """
  old, new = tuple(kernel.shape[:2]), tuple(int(s) for s in model_shape[:2])
  sizes = f'patch size {old} vs {new} (checkpoint vs model)'
  if stem is not None:
    raise ValueError(
        f'{source}: {EMBEDDING_KEY} has {sizes}, and the model has a {stem} '
        'stem: patch resizing applies to a patch embedding over pixels, not '
        "to one over a stem's features; use the checkpoint's patch size")
  if method == 'none':
    raise ValueError(
        f"{source}: {EMBEDDING_KEY} has {sizes} and "
        "config.pretrained.patch_resize is 'none'; set it to 'pi' (FlexiViT's "
        "pseudo-inverse resize) or 'bilinear' to resize the kernel")
  return resize_patch_kernel(kernel, new, method)


def differs_in_patch_size(kernel: np.ndarray, model_kernel: np.ndarray) -> bool:
  """True if two patch-embedding kernels differ only in their patch size."""
  return (np.ndim(kernel) == np.ndim(model_kernel) == 4
          and np.shape(kernel)[2:] == np.shape(model_kernel)[2:]
          and np.shape(kernel)[:2] != np.shape(model_kernel)[:2])
