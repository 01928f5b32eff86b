"""FLOPs of a step and the peak they are measured against (MFU).

Two sources of FLOPs: XLA's cost analysis of the lowered program (exact for
what runs, but it counts a loop body once) and analytic ViT formulas (matmuls
only) that correct it for gradient accumulation and scanned layers. The peak is
a datasheet number on TPU/GPU and a measured float32 matmul on CPU.
"""

from __future__ import annotations

import functools
import math
import re
import time
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp

from vit_jax.models import tome


def mfu(flops_per_step: float, step_time_s: float, num_devices: int,
        peak_flops_per_device: float) -> float:
  """Model FLOPs utilisation: achieved FLOP/s over the devices' peak, as 0..1.

  `flops_per_step` counts the whole step over all devices (global batch, forward
  and backward; a multiply-add is 2 FLOPs).
  """
  if step_time_s <= 0 or num_devices <= 0 or peak_flops_per_device <= 0:
    raise ValueError('step_time_s, num_devices and peak_flops_per_device must be '
                     f'positive, got {step_time_s}, {num_devices}, '
                     f'{peak_flops_per_device}.')
  return flops_per_step / step_time_s / (num_devices * peak_flops_per_device)


def step_flops(compiled_or_lowered: Any) -> float | None:
  """FLOPs of one call of a jitted function, from XLA's cost analysis.

  Pass `jax.jit(f).lower(*args)` for the global count that `mfu` expects. A
  `.compile()`d SPMD program reports the FLOPs of one device's partition instead
  (multiply by the device count). XLA counts a loop body once, so a step that
  scans over accum_steps micro-batches reports about one micro-batch: multiply
  by accum_steps, or use the analytic `vit_forward_flops`. Returns None when the
  backend offers no cost analysis.
  """
  try:
    analysis = compiled_or_lowered.cost_analysis()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('XLA cost analysis unavailable: %s', e)
    return None
  if isinstance(analysis, Mapping):
    analysis = [analysis]
  flops = [a.get('flops') for a in analysis or () if a]
  flops = [f for f in flops if f is not None and f >= 0]
  return float(sum(flops)) if flops else None


def vit_forward_flops(hidden: int, depth: int, mlp_dim: int, num_tokens: int,
                      patch: int, channels: int, num_classes: int, *,
                      cls_token: bool = True) -> float:
  """Analytic forward FLOPs of one image through a ViT (multiply-add = 2).

  Counts the matmuls only (patch embedding, q/k/v/out projections, the two
  attention products, the MLP, the head); norms, softmax and GELU are under 1%.
  `num_tokens` is the encoder's sequence length (197 for /16 at 224 with a cls
  token). Training costs about 3x this (backward = 2x forward).
  """
  patches = num_tokens - int(cls_token)
  embed = 2.0 * patches * patch * patch * channels * hidden
  head = 2.0 * hidden * num_classes
  return embed + depth * vit_block_flops(hidden, mlp_dim, num_tokens) + head


def vit_block_flops(hidden: int, mlp_dim: int, num_tokens: int,
                    attention_width: int | None = None) -> float:
  """Analytic forward FLOPs of one softmax-attention encoder block for one
  image (matmuls only). `attention_width` is heads * head_dim where it is not
  `hidden` (a block whose pruned heads were dropped)."""
  width = hidden if attention_width is None else attention_width
  attention = 4 * num_tokens * hidden * width + 2 * num_tokens * num_tokens * width
  mlp = 2 * num_tokens * hidden * mlp_dim
  return 2.0 * (attention + mlp)


def real_fft2_flops(grid: tuple[int, int]) -> float:
  """FLOPs of one real 2-D FFT (or its inverse) of one channel: 2.5 N log2 N.

  The usual count for a real transform (half a complex FFT's 5 N log2 N).
  XLA's cost analysis counts an FFT as 8 N times the *product* of
  floor(log2) of its lengths, which for a 14x14 grid is ~3.8x this; the
  FFTs are a few percent of a GFNet's FLOPs either way (docs/models.md).
  """
  n = grid[0] * grid[1]
  return 2.5 * n * math.log2(n) if n > 1 else 0.0


def heads_of_block(model: Any, layer: int) -> tuple[int, int]:
  """(heads, head_dim) of encoder block `layer`: `num_heads` is an int or, for
  a model whose pruned heads were dropped, one count per block."""
  heads = model.num_heads
  heads = heads[layer] if isinstance(heads, (tuple, list)) else heads
  head_dim = getattr(model, 'head_dim', None) or model.hidden_size // heads
  return heads, head_dim


def block_flops(model: Any, grid: tuple[int, int], tokens: int | None = None,
                merged: int = 0, layer: int = 0) -> float:
  """Analytic forward FLOPs of one encoder block of `model` for one image.

  Token merging (ToMe): `tokens` is the block's input length where earlier
  blocks shortened it (default the grid plus the cls token), and `merged`
  the tokens it merges between attention and MLP: the MLP runs on
  tokens - merged, plus the matching product (tome.matching_flops).
  `layer` picks the block's head count where blocks have their own.

  `model` is a VisionTransformer (or anything with its fields); every token
  mixer is counted: softmax attention, FAVOR+ (feature maps, phi(K)^T V and
  phi(Q) of that), the global filter (two FFTs and a complex product per
  frequency) and AFNO (two FFTs and a complex block-diagonal two-layer MLP
  over the kept frequencies; a complex multiply-add is 8 FLOPs).
  Matmuls, FFTs and the complex products only; norms and activations are a
  few percent.
  """
  hidden, mlp_dim = model.hidden_size, model.mlp_dim
  gh, gw = grid
  prefix = int(model.classifier in ('token', 'token_unpooled'))
  tokens = gh * gw + prefix if tokens is None else tokens
  mlp = 2.0 * 2 * (tokens - merged) * hidden * mlp_dim
  mixer = getattr(model, 'token_mixer', 'attention')
  if mixer == 'attention':
    if getattr(model, 'attention_impl', 'xla') != 'favor':
      heads, head_dim = heads_of_block(model, layer)
      softmax = (vit_block_flops(hidden, mlp_dim, tokens, heads * head_dim)
                 - 2.0 * 2 * tokens * hidden * mlp_dim)
      return softmax + mlp + tome.matching_flops(tokens, merged, head_dim)
    features = model.favor_features
    width = 2 * features if model.favor_kernel == 'trig' else features
    projections = 2.0 * 4 * tokens * hidden * hidden
    # Per head: q and k onto m features, then phi(K)^T V and phi(Q) (that).
    linear = 2.0 * tokens * hidden * (2 * features + 2 * width)
    return projections + linear + mlp
  ffts = 2 * real_fft2_flops(grid) * hidden
  frequencies = gh * (gw // 2 + 1)
  if mixer == 'global_filter':
    return ffts + 6.0 * frequencies * hidden + mlp
  kept = gh * int((gw // 2 + 1) * model.afno_hard_thresholding_fraction)
  wide = hidden // model.afno_num_blocks * model.afno_hidden_size_factor
  return ffts + 2 * 8.0 * kept * hidden * wide + mlp


def model_forward_flops(model: Any, image_shape: tuple[int, ...]) -> float:
  """Analytic forward FLOPs of one image through a patch-embedding ViT of any
  token mixer (`block_flops` per block, plus patch embedding and head); not
  for ResNet or conv stems. With `tome_r` each block counts at its own token
  count (tome.merge_schedule), and per-block head counts (dropped pruned
  heads) count each block's own attention width."""
  if getattr(model, 'resnet', None) is not None or getattr(model, 'conv_stem', ()):
    raise ValueError('model_forward_flops counts plain patch embeddings only')
  ph, pw = model.patch_size
  grid = (image_shape[0] // ph, image_shape[1] // pw)
  embed = 2.0 * grid[0] * grid[1] * ph * pw * image_shape[2] * model.hidden_size
  head = 2.0 * model.hidden_size * (model.num_classes or 0)
  prefix = int(model.classifier in ('token', 'token_unpooled'))
  tokens = grid[0] * grid[1] + prefix
  merges = (tome.merge_schedule(model.tome_r, tokens, prefix, model.num_layers)
            if getattr(model, 'tome_r', 0) else [0] * model.num_layers)
  blocks = 0.0
  for layer, merged in enumerate(merges):
    blocks += block_flops(model, grid, tokens, merged, layer)
    tokens -= merged
  return embed + blocks + head


def train_step_flops(lowered: Any, model: Any, image_shape: tuple[int, ...],
                     batch_size: int, accum_steps: int = 1) -> float | None:
  """Global FLOPs of one train step: XLA's count, corrected for its loops.

  XLA counts a loop body once. Gradient accumulation scans over `accum_steps`
  micro-batches (multiply); a ViT with `scan_layers` runs its blocks as one
  loop, so (num_layers - 1) blocks are added analytically, at 3x the forward
  (backward = 2x). Returns None when the backend has no cost analysis, or for
  a scanned model whose token count this cannot tell (a ResNet stem).
  """
  flops = step_flops(lowered)
  if not flops:
    return flops
  if getattr(model, 'scan_layers', False):
    if getattr(model, 'resnet', None) is not None:
      return None
    ph, pw = model.patch_size
    grid = (image_shape[0] // ph, image_shape[1] // pw)
    micro_batch = batch_size // accum_steps
    flops += (model.num_layers - 1) * 3 * micro_batch * block_flops(model, grid)
  return flops * accum_steps


# Datasheet dense bfloat16 peaks per JAX device, matched in order against
# device_kind (lowercase). TPU v2/v3 expose each of a chip's two cores as a device.
_PEAK_FLOPS = (
    (r'tpu v6 ?(lite|e)', 918e12),
    (r'tpu v5 ?(lite|e)', 197e12),
    (r'tpu v5p?\b', 459e12),
    (r'tpu v4', 275e12),
    (r'tpu v3', 123e12 / 2),
    (r'tpu v2', 45e12 / 2),
    (r'h100.*pcie', 756e12),
    (r'h100|h200|gh200', 989e12),
    (r'a100', 312e12),
    (r'l40s', 362e12),
    (r'\bl4\b', 121e12),
    (r'\ba10g?\b', 125e12),
)


@functools.lru_cache(maxsize=None)
def _measured_cpu_flops(product_dtype: str = 'float32', n: int = 1024,
                        repeats: int = 5) -> float:
  """Best-of-`repeats` FLOP/s of a jitted [n, n] @ [n, n] on this CPU, inputs in
  `product_dtype`, accumulated in float32."""
  x = jnp.ones((n, n), product_dtype)
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  matmul(x, x).block_until_ready()  # Compile and warm up.
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x, x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def peak_flops_per_device(device: Any = None, override: float | None = None,
                          product_dtype: str = 'float32') -> float | None:
  """Peak FLOP/s of one device, the denominator of MFU.

  `override` (config.metrics.peak_flops) wins. TPUs and common NVIDIA GPUs use their
  datasheet dense bfloat16 peak. On CPU there is no datasheet number, so MFU is
  against a measured peak: the best time of a jitted float32 1024x1024 matmul,
  measured once per process and shared among the process's CPU devices (they run
  on the same cores); with `product_dtype='bfloat16'` (the bf16 precision
  policies) the same matmul on bf16 inputs, whose peak is several times higher
  on CPUs with AMX or AVX512-BF16. Unknown accelerators return None (MFU is then not logged).
  """
  if override:
    return float(override)
  device = device or jax.devices()[0]
  if device.platform == 'cpu':
    return (_measured_cpu_flops(jnp.dtype(product_dtype).name)
            / max(len(jax.local_devices(backend='cpu')), 1))
  kind = device.device_kind.lower()
  for pattern, peak in _PEAK_FLOPS:
    if re.search(pattern, kind):
      return peak
  logging.warning('No peak FLOP/s known for %r; set config.metrics.peak_flops for MFU.',
                  device.device_kind)
  return None
