"""Mixup and cutmix on device: one mixing weight per batch, inside the train step.

    mixup  (Zhang et al. 2018): x = lam * x + (1 - lam) * x_pair
    cutmix (Yun et al. 2019):   a box of x is replaced by the same box of x_pair
The targets are one-hot with label smoothing, mixed with the same lam; for
cutmix lam is corrected to the box's actual area after clipping to the image
(timm's `correct_lam`). A batch is mixed with chance `prob`; when both alphas are
on, cutmix is picked with chance `switch_prob`, else mixup (timm's batch mode).

Each example is paired with the example at the mirrored position of the
*global* batch (the batch reversed). Mixing runs once per step on the whole
global batch, before gradient accumulation, so accumulated micro-batches still
add up to the big batch.

Under shard_map the step body sees one device's shard. The choice made here:
every device draws the same lam, box and mixup/cutmix decision (the key is
taken before the device index is folded in), and the pairing is still the
global reversal: device d receives the shard of device n-1-d with one
`ppermute` and reverses it. So 'jit' and 'shard_map' mix identically, and the
result does not depend on the number of devices (the price is one batch of
images sent between devices per step, which the jit mode pays as well).

Config section `config.mixup` (configs/common.py): mixup_alpha, cutmix_alpha
(0 = off), prob, switch_prob.
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from vit_jax import optim
from vit_jax.config_checks import is_number
from vit_jax.config_checks import require

# fold_in tag of the mixing key within a step's key (the dropout keys use the
# micro-batch index, small numbers).
_MIX_STREAM = 0x6D6978


def check_mixup(mixup: Mapping[str, Any]) -> None:
  """Raises ConfigError naming the bad `config.mixup` key."""
  for key in ('mixup_alpha', 'cutmix_alpha', 'prob', 'switch_prob'):
    require(is_number(mixup[key]),
            f'config.mixup.{key} must be a number, got {mixup[key]!r}')
  for key in ('mixup_alpha', 'cutmix_alpha'):
    require(mixup[key] >= 0, f'config.mixup.{key} must be >= 0 (0 disables), '
            f'got {mixup[key]}')
  for key in ('prob', 'switch_prob'):
    require(0 <= mixup[key] <= 1,
            f'config.mixup.{key} must be in [0, 1], got {mixup[key]}')


def is_enabled(mixup: Mapping[str, Any] | None) -> bool:
  """Whether a step with this `config.mixup` mixes anything (static)."""
  return mixup is not None and (mixup['mixup_alpha'] > 0 or
                          mixup['cutmix_alpha'] > 0) and mixup['prob'] > 0


def mixing_key(step_rng: jax.Array) -> jax.Array:
  """The mixing key of a step, derived from the step's key (same on all devices)."""
  return jax.random.fold_in(step_rng, _MIX_STREAM)


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int
               ) -> tuple[jax.Array, jax.Array]:
  """A box of area ~ (1 - lam) * H * W at a uniform centre, clipped to the image.

  Returns (mask [H, W] bool, True inside the box; corrected lam = 1 - box area /
  image area). The box's sides are floor(H * sqrt(1 - lam)) and
  floor(W * sqrt(1 - lam)), centred at a uniform pixel; clipping at the border
  shrinks it, hence the correction.
  """
  cut = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * cut).astype(jnp.int32)
  cut_w = jnp.floor(width * cut).astype(jnp.int32)
  key_y, key_x = jax.random.split(rng)
  cy = jax.random.randint(key_y, (), 0, height)
  cx = jax.random.randint(key_x, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows, cols = jnp.arange(height), jnp.arange(width)
  mask = (((rows >= y0) & (rows < y1))[:, None] &
          ((cols >= x0) & (cols < x1))[None, :])
  area = ((y1 - y0) * (x1 - x0)).astype(jnp.float32)
  return mask, 1.0 - area / (height * width)


def sample_mixing(rng: jax.Array, mixup: Mapping[str, Any], height: int,
                  width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws one batch's mixing: (lam [], use_cutmix [] bool, box mask [H, W] bool).

  A batch that is not mixed (chance 1 - prob) gets lam = 1 and no cutmix, so
  mixing it returns it unchanged.
  """
  mix_alpha, cut_alpha = float(mixup['mixup_alpha']), float(mixup['cutmix_alpha'])
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
  apply = jax.random.uniform(k_apply) < mixup['prob']
  if mix_alpha > 0 and cut_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < mixup['switch_prob']
  else:
    use_cutmix = jnp.asarray(cut_alpha > 0)
  use_cutmix = use_cutmix & apply
  one = jnp.ones((), jnp.float32)
  lam_mix = (jax.random.beta(k_mix, mix_alpha, mix_alpha) if mix_alpha > 0
             else one)
  lam_cut = (jax.random.beta(k_cut, cut_alpha, cut_alpha) if cut_alpha > 0
             else one)
  mask, lam_box = cutmix_box(k_box, lam_cut, height, width)
  lam = jnp.where(use_cutmix, lam_box, lam_mix)
  lam = jnp.where(apply, lam, one).astype(jnp.float32)
  return lam, use_cutmix, mask & use_cutmix


def _partner(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Each row's partner: the global batch reversed (see the module docstring)."""
  if axis_name is not None:
    n = jax.lax.axis_size(axis_name)
    x = jax.lax.ppermute(x, axis_name, [(i, n - 1 - i) for i in range(n)])
  return jnp.flip(x, axis=0)


def mix_batch(rng: jax.Array, batch: Mapping[str, jax.Array],
              mixup: Mapping[str, Any], *, num_classes: int,
              label_smoothing: float = 0.0,
              axis_name: str | None = None) -> dict[str, jax.Array]:
  """Mixes `batch` ({'image': [B, H, W, C], 'label': int [B]}).

  Returns the batch with mixed images and soft targets 'label' [B, num_classes]
  (float32, rows sum to 1, label smoothing already applied). `axis_name`: the
  mesh axis the batch is split over when this runs per device (shard_map).
  """
  images, labels = batch['image'], batch['label']
  lam, use_cutmix, mask = sample_mixing(rng, mixup, images.shape[1],
                                        images.shape[2])
  other = _partner(images, axis_name)
  blended = (lam * images.astype(jnp.float32) +
             (1.0 - lam) * other.astype(jnp.float32)).astype(images.dtype)
  pasted = jnp.where(mask[None, :, :, None], other, images)
  mixed = jnp.where(use_cutmix, pasted, blended)
  targets = optim.one_hot_smoothed(labels, num_classes, label_smoothing)
  targets = lam * targets + (1.0 - lam) * _partner(targets, axis_name)
  return dict(batch, image=mixed, label=targets)
