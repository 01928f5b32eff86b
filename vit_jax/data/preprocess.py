"""Image preprocessing ops: small pure TF functions, one transformation each.

Every op takes one image `[height, width, channels]` (no batch axis) so it can
run inside `tf.data.Dataset.map`. Random ops take an explicit stateless seed
(int32/int64 `[2]`): the same image and seed always give the same output.

Decoded images are uint8 in [0, 255]; `resize` returns float32 in [0, 255] and
`to_model_range` maps that to the model's [-1, 1].

`train_preprocess` / `eval_preprocess` compose the ops as `config.pp` says:

  train_crop='inception'  random box of area fraction [area_min, 1] and aspect
                          ratio [3/4, 4/3] (the Inception/ViT recipe), resized
                          to `size`;
  train_crop='random'     resize to `round(size * 8 / 7)` (256 for 224, 32 for
                          28), then a uniformly placed `size` x `size` crop; no
                          padding;
  train_crop='resize'     plain resize to `size`;
  train_crop='pad'        plain resize to `size`, zero (black) border of
                          `crop_padding` pixels, then a uniformly placed
                          `size` x `size` crop: shifts without zoom, so train
                          and eval see objects at the same scale (the
                          CIFAR/Fashion-MNIST recipe);
  flip                    random horizontal flip;
  randaugment_layers      > 0: RandAugment(layers, randaugment_magnitude) on
                          the uint8 image after crop and flip (augment.py),
                          magnitudes mapped to op arguments by
                          randaugment_rule ('reference' = TF/big_vision,
                          'increasing' = timm-style; augment_rules.py);
  random_erase_prob       > 0: random erasing after the map to [-1, 1], so
                          erased pixels are N(0, 1) noise in model units;
  eval                    resize to `size` or, if `eval_crop_fraction < 1`,
                          to `round(size / fraction)` and a central crop.
"""

from collections.abc import Callable

from vit_jax.data import augment
from vit_jax.data.checks import augment_settings
from vit_jax.data.checks import randaugment_rule
from vit_jax.data.tf_runtime import tf


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear resize to `[size, size, C]`, float32 in [0, 255]."""
  image = tf.image.resize(tf.cast(image, tf.float32), (size, size),
                          method='bilinear')
  return tf.clip_by_value(image, 0.0, 255.0)


def inception_crop(image: tf.Tensor, seed: tf.Tensor,
                   area_min: float) -> tf.Tensor:
  """A random box covering `[area_min, 1]` of the image, aspect in [3/4, 4/3].

  Returns the crop `[h', w', C]` in the input dtype; resize it afterwards. If
  no box fits after 10 attempts the whole image is returned.
  """
  begin, box_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image),
      bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
      seed=seed,
      min_object_covered=0.0,
      aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(area_min, 1.0),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, box_size)
  crop.set_shape([None, None, image.shape[-1]])
  return crop


def random_crop(image: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """Resize to `round(size * 8 / 7)`, then a random `[size, size, C]` crop."""
  image = resize(image, int(round(size * 8 / 7)))
  return tf.image.stateless_random_crop(
      image, [size, size, image.shape[-1]], seed)


def pad_crop(image: tf.Tensor, seed: tf.Tensor, size: int,
             padding: int) -> tf.Tensor:
  """Resize to `size`, pad `padding` zeros on every side, random `size` crop.

  A shift of up to `padding` pixels in each direction, scale unchanged.
  """
  image = resize(image, size)
  image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  return tf.image.stateless_random_crop(
      image, [size, size, image.shape[-1]], seed)


def central_crop(image: tf.Tensor, size: int, fraction: float) -> tf.Tensor:
  """Resize to `round(size / fraction)`, then the central `[size, size, C]`."""
  outer = int(round(size / fraction))
  image = resize(image, outer)
  offset = (outer - size) // 2
  return image[offset:offset + size, offset:offset + size]


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Mirrors the image left-right with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """Converts `[H, W, C]` to `channels` (1 or 3).

  Grayscale is repeated to 3 channels; RGB becomes luminance
  (`tf.image.rgb_to_grayscale`, ITU-R 601 weights) when 1 channel is asked;
  an alpha channel is dropped.
  """
  have = image.shape[-1]
  if have is None:
    raise ValueError('to_channels needs a static channel count.')
  if have == 4:
    image, have = image[..., :3], 3
  if have == channels:
    return image
  if have == 1 and channels == 3:
    return tf.repeat(image, 3, axis=-1)
  if have == 3 and channels == 1:
    return tf.image.rgb_to_grayscale(image)
  raise ValueError(f'Cannot convert {have}-channel images to {channels}.')


def to_model_range(image: tf.Tensor) -> tf.Tensor:
  """Maps [0, 255] to float32 [-1, 1]."""
  return tf.cast(image, tf.float32) / 127.5 - 1.0


def train_preprocess(
    pp, size: int,
    channels: int) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """Returns `f(image, seed) -> float32 [size, size, channels]` in [-1, 1].

  `image` is uint8 [H, W, C], `seed` int [2]; the output depends only on them.
  With random erasing on, erased pixels are N(0, 1) noise and may leave
  [-1, 1] (as in DeiT/timm).
  """
  layers, magnitude, erase_prob = augment_settings(pp)
  rule = randaugment_rule(pp)

  def fn(image, seed):
    # The first two of a 4-way split equal a 2-way split: crops and flips are
    # the same with augmentation on or off.
    crop_seed, flip_seed, randaugment_seed, erase_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    if pp.train_crop == 'inception':
      image = resize(inception_crop(image, crop_seed, pp.area_min), size)
    elif pp.train_crop == 'random':
      image = random_crop(image, crop_seed, size)
    elif pp.train_crop == 'pad':
      image = pad_crop(image, crop_seed, size, pp.get('crop_padding', 4))
    else:
      image = resize(image, size)
    if pp.flip:
      image = random_flip(image, flip_seed)
    if layers:
      image = tf.cast(tf.round(image), tf.uint8)  # RandAugment's domain.
      image = augment.randaugment(image, randaugment_seed, layers, magnitude,
                                  rule)
    image = to_model_range(to_channels(image, channels))
    if erase_prob:
      image = augment.random_erasing(image, erase_seed, erase_prob)
    return image

  return fn


def eval_preprocess(pp, size: int,
                    channels: int) -> Callable[[tf.Tensor], tf.Tensor]:
  """Returns `f(image uint8 [H, W, C]) -> float32 [size, size, channels]`."""

  def fn(image):
    if pp.eval_crop_fraction < 1.0:
      image = central_crop(image, size, pp.eval_crop_fraction)
    else:
      image = resize(image, size)
    return to_model_range(to_channels(image, channels))

  return fn
