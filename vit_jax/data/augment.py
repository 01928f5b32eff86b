"""RandAugment and random erasing as stateless TF ops on one image.

Both run inside `tf.data.Dataset.map` on one image `[height, width, channels]`
and take an explicit stateless seed (int32/int64 `[2]`), so the output is a
function of (image, seed) and the input pipeline's exact resume holds.

RandAugment (Cubuk et al. 2019; the op set of the TF official / big_vision
implementation, which the AugReg and "Better plain ViT baselines" recipes use):
each of `num_layers` layers picks one of the 16 ops in `OPS` uniformly and
applies it at `magnitude`. Magnitudes are on the TF scale where 10 is an op's
reference maximum (rotate 30 degrees, shear 0.3, translate 100 px of 224,
cutout half-size 40 px of 224); larger values (AugReg uses 15 and 20)
extrapolate, up to `MAX_MAGNITUDE`. How the magnitude becomes each op's
argument is a `rule` (augment_rules.py, `config.pp.randaugment_rule`):
'reference' (default) is the TF official / big_vision mapping the recipes'
published numbers were trained with, in which Posterize and Solarize weaken
as the magnitude grows (at 10 Solarize is the identity) and the enhance
factors run from 0.1 at 0 through 1 (identity) at 5 to 1.9 at 10, unsigned;
'increasing' makes every op grow with magnitude, 0 being the identity, as
timm's "increasing" variants do. Geometric ops and Cutout fill with grey 128
as in the reference. Signed arguments get a random sign.

Random erasing (Zhong et al. 2017, as DeiT/timm use it): with a probability,
one box of area [0.02, 1/3] of the image and log-uniform aspect [0.3, 3.3] is
replaced by per-pixel N(0, 1) noise. It runs on the model-range float image,
so the noise is in that scale (and, as in timm, not clipped).
"""

import math
from collections.abc import Callable


from vit_jax.data import augment_rules
from vit_jax.data.checks import MAX_MAGNITUDE
from vit_jax.data.tf_runtime import tf

RULES = tuple(augment_rules.RULES)  # Valid `rule` names.
DEFAULT_RULE = augment_rules.DEFAULT_RULE
_FILL = 128  # Grey for pixels moved in from outside and for Cutout.


# ------------------------------------------------------------------ helpers


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def _blend(degenerate: tf.Tensor, image: tf.Tensor,
           factor: tf.Tensor) -> tf.Tensor:
  """`degenerate + factor * (image - degenerate)`, uint8; factor 1 = image."""
  degenerate = tf.cast(degenerate, tf.float32)
  return _to_uint8(degenerate + factor * (tf.cast(image, tf.float32) -
                                          degenerate))


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """float32 luminance `[H, W, 1]`; a 1-channel image is its own."""
  image = tf.cast(image, tf.float32)
  if image.shape[-1] == 1:
    return image
  return tf.image.rgb_to_grayscale(image)


def _transform(image: tf.Tensor, transform: list[tf.Tensor]) -> tf.Tensor:
  """Projective warp; `transform` maps output (x, y) to input coordinates.

  The 8 numbers `[a0, a1, a2, b0, b1, b2, c0, c1]` send output pixel (x, y)
  to input `((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k)` with
  `k = c0 x + c1 y + 1`; nearest-neighbour sampling, grey outside.
  """
  transform = tf.reshape(tf.stack([tf.cast(t, tf.float32) for t in transform]),
                         [1, 8])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[tf.newaxis], transforms=transform,
      output_shape=tf.shape(image)[:2], fill_value=float(_FILL),
      interpolation='NEAREST', fill_mode='CONSTANT')
  return tf.ensure_shape(out[0], image.shape)


# ------------------------------------------------------------ colour ops


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """Stretches each channel linearly to span [0, 255] (flat channels kept)."""
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
  stretched = (x - lo) * (255.0 / tf.maximum(hi - lo, 1.0))
  return _to_uint8(tf.where(hi > lo, stretched, x))


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """PIL-style histogram equalisation of one int32 `[H, W]` channel."""
  histogram = tf.math.bincount(channel, minlength=256, maxlength=256)
  # The most intense occupied bin is left out of the step, as in PIL.
  last = tf.gather(histogram, tf.reduce_max(channel))
  step = (tf.reduce_sum(histogram) - last) // 255
  lut = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
  lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
  return tf.where(step > 0, tf.gather(lut, channel), channel)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """Histogram equalisation per channel."""
  channels = tf.unstack(tf.cast(image, tf.int32), num=image.shape[-1], axis=-1)
  out = tf.stack([_equalize_channel(c) for c in channels], axis=-1)
  return tf.cast(out, tf.uint8)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
  """Keeps the `bits` (0..8) most significant bits of each value.

  0 bits keeps the top bit, as the reference does in effect: its 8-bit shift
  of a uint8 is clamped to 7 by TF (CPU), where the preprocessing runs.
  """
  shift = tf.constant(min(8 - bits, 7), tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image: tf.Tensor, threshold: float) -> tf.Tensor:
  """Inverts values >= threshold (256 = identity, 0 = invert all)."""
  return tf.where(tf.cast(image, tf.float32) < threshold, image, 255 - image)


def solarize_add(image: tf.Tensor, addition: float,
                 threshold: float = 128.0) -> tf.Tensor:
  """Adds `addition` (clipped to 255) to values below `threshold`."""
  x = tf.cast(image, tf.float32)
  return tf.where(x < threshold, _to_uint8(x + addition), image)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """Saturation: blend with the grayscale image (identity for 1 channel)."""
  if image.shape[-1] == 1:
    return image
  gray = tf.repeat(_grayscale(image), image.shape[-1], axis=-1)
  return _blend(gray, image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """Blend with a flat image at the mean luminance (integer, as PIL)."""
  mean = tf.round(tf.reduce_mean(tf.round(_grayscale(image))))
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """Blend with black."""
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """Blend with a 3x3-smoothed image (border pixels stay unsmoothed)."""
  x = tf.cast(image, tf.float32)
  channels = image.shape[-1]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, tf.newaxis, tf.newaxis], [1, 1, channels, 1])
  smooth = tf.nn.depthwise_conv2d(x[tf.newaxis], kernel, [1, 1, 1, 1],
                                  padding='VALID')[0]
  smooth = tf.round(smooth)
  interior = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(interior > 0, smooth, x)
  return _blend(degenerate, image, factor)


# ----------------------------------------------------------- geometric ops


def rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
  """Rotation about the image centre."""
  angle = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  shape = tf.cast(tf.shape(image), tf.float32)
  w, h = shape[1] - 1.0, shape[0] - 1.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  dx = (w - (cos * w - sin * h)) / 2.0
  dy = (h - (sin * w + cos * h)) / 2.0
  return _transform(image, [cos, -sin, dx, sin, cos, dy, 0.0, 0.0])


def shear_x(image: tf.Tensor, level: tf.Tensor) -> tf.Tensor:
  """Input x = x + level * y (about the top-left corner, as the reference)."""
  return _transform(image, [1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image: tf.Tensor, level: tf.Tensor) -> tf.Tensor:
  return _transform(image, [1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0])


def translate_x(image: tf.Tensor, fraction: tf.Tensor) -> tf.Tensor:
  """Shift right by `fraction` of the width (negative = left)."""
  pixels = fraction * tf.cast(tf.shape(image)[1], tf.float32)
  return _transform(image, [1.0, 0.0, -pixels, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image: tf.Tensor, fraction: tf.Tensor) -> tf.Tensor:
  """Shift down by `fraction` of the height (negative = up)."""
  pixels = fraction * tf.cast(tf.shape(image)[0], tf.float32)
  return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, -pixels, 0.0, 0.0])


def cutout(image: tf.Tensor, fraction: float, seed: tf.Tensor) -> tf.Tensor:
  """Grey square of half-side `fraction * min(H, W)` at a random centre.

  The square is clipped at the borders (centre uniform over the image).
  """
  shape = tf.shape(image)
  half = tf.cast(tf.round(fraction * tf.cast(tf.minimum(shape[0], shape[1]),
                                             tf.float32)), tf.int32)
  centre = tf.random.stateless_uniform([2], seed, minval=0,
                                       maxval=tf.int32.max, dtype=tf.int32)
  cy, cx = centre[0] % shape[0], centre[1] % shape[1]
  rows = tf.range(shape[0])[:, tf.newaxis, tf.newaxis]
  cols = tf.range(shape[1])[tf.newaxis, :, tf.newaxis]
  inside = ((rows >= cy - half) & (rows < cy + half) &
            (cols >= cx - half) & (cols < cx + half))
  return tf.where(inside, tf.constant(_FILL, image.dtype), image)


# ---------------------------------------------------------------- the op set


# name -> op(image, *args); the args come from an augment_rules rule table.
OPS: dict[str, Callable[..., tf.Tensor]] = {
    'AutoContrast': autocontrast,
    'Equalize': equalize,
    'Invert': invert,
    'Rotate': rotate,
    'Posterize': posterize,
    'Solarize': solarize,
    'SolarizeAdd': solarize_add,
    'Color': color,
    'Contrast': contrast,
    'Brightness': brightness,
    'Sharpness': sharpness,
    'ShearX': shear_x,
    'ShearY': shear_y,
    'TranslateX': translate_x,
    'TranslateY': translate_y,
    'Cutout': cutout,
}


def check_magnitude(magnitude: float) -> None:
  """Raises ValueError outside [0, MAX_MAGNITUDE]."""
  if not 0.0 <= magnitude <= MAX_MAGNITUDE:
    raise ValueError(f'RandAugment magnitude {magnitude} must be in '
                     f'[0, {MAX_MAGNITUDE:g}].')


def op_args(name: str, seed: tf.Tensor, magnitude: float,
            rule: str = DEFAULT_RULE) -> tuple:
  """The arguments `rule` gives op `name` at `magnitude` (after the image)."""
  check_magnitude(magnitude)
  augment_rules.check_rule(rule)
  return augment_rules.RULES[rule][name](float(magnitude), seed)


def apply_op(name: str, image: tf.Tensor, seed: tf.Tensor, magnitude: float,
             rule: str = DEFAULT_RULE) -> tf.Tensor:
  """One RandAugment op on a uint8 `[H, W, C]` image; same shape and dtype."""
  out = OPS[name](image, *op_args(name, seed, magnitude, rule))
  return tf.ensure_shape(tf.cast(out, tf.uint8), image.shape)


# Both entry points are plain graph code (no tensor-dependent Python control
# flow), so tf.data need not autograph-convert them (seconds per process).
@tf.autograph.experimental.do_not_convert
def randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int,
                magnitude: float, rule: str = DEFAULT_RULE) -> tf.Tensor:
  """`num_layers` uniformly chosen ops at `magnitude` on a uint8 image.

  Args:
    image: uint8 `[H, W, C]`, C = 1 or 3 (static).
    seed: stateless seed, int `[2]`.
    num_layers: ops applied in sequence (0 = identity).
    magnitude: in [0, MAX_MAGNITUDE]; 10 = each op's reference maximum.
    rule: magnitude -> argument mapping, one of `RULES` (augment_rules.py):
      'reference' (TF official / big_vision) or 'increasing' (timm-style).

  Returns:
    uint8 `[H, W, C]`.
  """
  check_magnitude(magnitude)
  augment_rules.check_rule(rule)
  if image.dtype != tf.uint8:
    raise ValueError(f'randaugment expects uint8 images, got {image.dtype}.')
  names = list(OPS)
  layer_seeds = tf.random.experimental.stateless_split(seed, 2 * num_layers)
  for layer in range(num_layers):
    choice = tf.random.stateless_uniform(
        [], layer_seeds[2 * layer], minval=0, maxval=len(names), dtype=tf.int32)
    arg_seed = layer_seeds[2 * layer + 1]
    branches = [
        lambda name=name, image=image: apply_op(name, image, arg_seed,
                                                magnitude, rule)
        for name in names]
    image = tf.ensure_shape(tf.switch_case(choice, branches), image.shape)
  return image


@tf.autograph.experimental.do_not_convert
def random_erasing(image: tf.Tensor, seed: tf.Tensor, probability: float,
                   area_range: tuple[float, float] = (0.02, 1 / 3),
                   aspect_range: tuple[float, float] = (0.3, 3.3),
                   max_attempts: int = 10) -> tf.Tensor:
  """With `probability`, one box of the float image becomes N(0, 1) noise.

  Box area is uniform in `area_range` (fractions of the image), aspect
  (height / width) log-uniform in `aspect_range`; of `max_attempts` draws the
  first that fits inside the image is used (none fits: no erase).

  Args:
    image: float32 `[H, W, C]`, normally already in the model range.
    seed: stateless seed, int `[2]`.
    probability: chance of erasing, in [0, 1].

  Returns:
    float32 `[H, W, C]`.
  """
  if probability <= 0.0:
    return image
  apply_seed, box_seed, place_seed, noise_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  area = tf.cast(height * width, tf.float32)
  draws = tf.random.stateless_uniform([2, max_attempts], box_seed)
  target = area * (area_range[0] + draws[0] * (area_range[1] - area_range[0]))
  log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
  aspect = tf.exp(log_lo + draws[1] * (log_hi - log_lo))
  box_h = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  box_w = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  fits = (box_h < height) & (box_w < width)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  box_h, box_w = box_h[first], box_w[first]
  place = tf.random.stateless_uniform([2], place_seed)
  top = tf.cast(place[0] * tf.cast(height - box_h + 1, tf.float32), tf.int32)
  left = tf.cast(place[1] * tf.cast(width - box_w + 1, tf.float32), tf.int32)
  rows = tf.range(height)[:, tf.newaxis, tf.newaxis]
  cols = tf.range(width)[tf.newaxis, :, tf.newaxis]
  inside = ((rows >= top) & (rows < top + box_h) &
            (cols >= left) & (cols < left + box_w))
  erase = ((tf.random.stateless_uniform([], apply_seed) < probability) &
           tf.reduce_any(fits))
  noise = tf.random.stateless_normal(shape, noise_seed, dtype=image.dtype)
  return tf.where(inside & erase, noise, image)
