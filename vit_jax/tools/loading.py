"""A trained model ready for inference, from a workdir or a released `.npz`.

Every tool needs more than params: the module that reads them, the class names
to print, and the input the model was trained on (image size, channels, eval
preprocessing). A workdir written by train.py has all of it in its checkpoint's
`meta` (the run's config as JSON). A released file holds only params, so the
caller names the registered model and the image size; the number of classes,
the input channels, a `pre_logits` layer and the heads per block (a file
whose pruned heads were dropped, vit_jax.models.head_counts) are read off the
file's shapes.

Images go through `read_image` (any PNG/JPEG/GIF/BMP, grayscale or colour, of
up to `--max_image_pixels` pixels, measured from the header before decoding:
vit_jax.data.pixel_limit) and `TrainedModel.preprocess`, which is the eval pipeline's own
`data.preprocess.eval_preprocess`, so a prediction sees what evaluation saw.
"""

import dataclasses
import json
import re
from typing import Any

from absl import flags
from absl import logging
from etils import epath
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import checkpoint
from vit_jax import config_keys
from vit_jax import data
from vit_jax import models
from vit_jax.checkpoint import layouts
from vit_jax.models import head_counts
from vit_jax.checkpoint import quantized
from vit_jax.checkpoint import workdir_reader
from vit_jax.data import pixel_limit
from vit_jax.data import preprocess
from vit_jax.data.tf_runtime import tf

Params = dict[str, Any]

# Eval preprocessing of the released models: a plain resize to the input size.
RELEASED_EVAL_PP = dict(train_crop='resize', area_min=1.0, flip=False,
                        eval_crop_fraction=1.0)
# First layer of each model family; its kernel's input axis is the channel count.
_INPUT_LAYERS = ('conv_root', 'embedding', 'stem')


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A module with its params and what its inputs must look like.

  Attributes:
    model: the flax Module; `model.apply({'params': params}, images)` with
      images float32 [batch, image_size, image_size, channels] in [-1, 1].
    params: nested dict of numpy arrays.
    class_names: the label names, index = class.
    image_size: the square input resolution the model was trained at.
    channels: input channels (1 or 3).
    pp: the `config.pp` section whose eval settings preprocess inputs.
    source: the workdir or file, for messages.
    model_config: the model section that rebuilds `model` unrolled
      (`models.create_model(model_config, num_classes)`). For an int8 file
      `model` is its int8 (qwix PTQ) model and `params` hold int8 arrays.
  """
  model: nn.Module
  params: Params
  class_names: tuple[str, ...]
  image_size: int
  channels: int
  pp: ml_collections.ConfigDict
  source: str
  model_config: ml_collections.ConfigDict | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, C] -> float32 [image_size, image_size, channels], as in eval."""
    fn = preprocess.eval_preprocess(self.pp, self.image_size, self.channels)
    return fn(tf.convert_to_tensor(image)).numpy()


# ---------------------------------------------------------------- workdirs


def saved_config(workdir: str, step: int | None = None
                 ) -> ml_collections.ConfigDict:
  """The training config a workdir's checkpoint was written with (unlocked).

  A config saved with the earlier flat key names comes back in the current
  layout (vit_jax.config_keys.upgrade).

  An int8 file (vit_jax.tools.quantize) of a workdir's model carries that
  config too.

  Raises:
    FileNotFoundError: no checkpoints under `workdir`.
    ValueError: `step` has no checkpoint, or the checkpoint has no config.
  """
  if quantized.is_quantized(workdir):
    if step is not None:
      raise ValueError(f'step={step} only applies to a workdir; {workdir} is '
                       'an int8 file.')
    saved = quantized.read_metadata(workdir).get('config')
    if not saved:
      raise ValueError(f'{workdir} was quantized from a released file and '
                       'holds no training config; give --config.')
    return ml_collections.ConfigDict(config_keys.upgrade(json.loads(saved)))
  meta = workdir_reader.load_meta(workdir, step)
  if 'config' not in meta:
    raise ValueError(f'the checkpoint in {workdir} has no saved config; use '
                     '--checkpoint with --model instead.')
  return ml_collections.ConfigDict(
      config_keys.upgrade(json.loads(meta['config'])))


def load_workdir(workdir: str, step: int | None = None) -> TrainedModel:
  """The model a train.py workdir holds, at `step` (default: the latest).

  Class names come from the run's dataset; if it cannot be opened here (not
  prepared on this machine), classes are named by their index.
  """
  params = checkpoint.load_params(workdir, step)
  config = saved_config(workdir, step)
  num_classes = _num_classes(params, workdir)
  model = models.create_model(config.model, num_classes)
  size, channels = config.input.image_size, config.input.channels
  image_shape = (size, size, channels)
  check_params_fit(model, params, image_shape, workdir)
  model_config = ml_collections.ConfigDict(config.model)
  if getattr(model, 'scan_layers', False):
    # Scan and remat only speed up training; the tools read per-block names
    # (attention maps: encoderblock_{i}/.../attention_weights).
    model = model.clone(scan_layers=False, remat_policy='none')
    params = layouts.unstack_encoder_blocks(params)
    model_config.update(scan_layers=False, remat_policy='none')
  return TrainedModel(
      model=model, params=params,
      class_names=_dataset_class_names(config, num_classes),
      image_size=config.input.image_size, channels=config.input.channels,
      pp=config.pp, source=str(workdir), model_config=model_config)


def _dataset_class_names(config: ml_collections.ConfigDict,
                         num_classes: int) -> tuple[str, ...]:
  try:
    names = data.get_dataset_info(config).class_names
  except Exception as e:  # pylint: disable=broad-except
    # Names are only labels for the output; any failure to open the data
    # (missing, not prepared, no network) must not stop inference.
    logging.warning('Class names of %r unavailable (%s); using indices.',
                    config.dataset, e)
    return numbered_class_names(num_classes)
  if len(names) != num_classes:
    logging.warning('Dataset %r has %d classes but the head has %d; using '
                    'indices.', config.dataset, len(names), num_classes)
    return numbered_class_names(num_classes)
  return tuple(names)


# ---------------------------------------------------------------- released files


def load_released(path: str, model_name: str, image_size: int, *,
                  class_names_file: str | None = None) -> TrainedModel:
  """A released-layout `.npz` (ours from tools.export, or an official file).

  Args:
    path: the .npz; any layout `checkpoint.load_npz` reads.
    model_name: the registered variant, e.g. 'ViT-B_16'. Head size, input
      channels, `pre_logits` (representation_size) and, where pruned heads
      were dropped, num_heads per block and head_dim come from the file.
    image_size: the resolution the file was trained at (its posemb length).
    class_names_file: one class name per line; default: indices.
  """
  params = checkpoint.load_npz(path)
  num_classes = _num_classes(params, path)
  overrides = {}
  if 'pre_logits' in params:
    overrides['representation_size'] = int(
        params['pre_logits']['kernel'].shape[-1])
  overrides.update(head_counts.heads_from_params(params))
  model = models.create_model(model_name, num_classes, **overrides)
  models.check_image_size(model_name, image_size)
  channels = _input_channels(params, path)
  check_params_fit(model, params, (image_size, image_size, channels), path,
                   hint='check --model and --image_size')
  names = (read_class_names(class_names_file, num_classes) if class_names_file
           else numbered_class_names(num_classes))
  return TrainedModel(
      model=model, params=params, class_names=names, image_size=image_size,
      channels=channels, pp=ml_collections.ConfigDict(RELEASED_EVAL_PP),
      source=str(path),
      model_config=models.model_section(model_name, **overrides))


def load_quantized(path: str, *, class_names_file: str | None = None
                   ) -> TrainedModel:
  """An int8 file of vit_jax.tools.quantize: the PTQ model and its params.

  The file names its model, input and classes; every array is checked
  against that model before anything runs (vit_jax.checkpoint.quantized).
  """
  # Here: quantization imports qwix, which only int8 models need.
  from vit_jax import quantization  # pylint: disable=g-import-not-at-top
  arrays, meta = quantized.read(path)
  try:
    model_config = ml_collections.ConfigDict(meta['model'])
    qcfg = ml_collections.ConfigDict(meta['quantization'])
    size, channels = int(meta['image_size']), int(meta['channels'])
    names = tuple(meta['class_names'])
    pp = ml_collections.ConfigDict(meta['pp'])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f'{path}: incomplete quantization metadata ({e!r}).') from None
  model = models.create_model(model_config, len(names))
  abstract = quantization.abstract_quantized_params(
      model, qcfg, (size, size, channels))
  float_abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels)),
      train=False))['params']
  params = quantized.from_arrays(arrays, abstract, str(path), float_abstract)
  if class_names_file:
    names = read_class_names(class_names_file, len(names))
  return TrainedModel(
      model=quantization.ptq_model(model, qcfg), params=params,
      class_names=names, image_size=size, channels=channels, pp=pp,
      source=str(path), model_config=model_config)


def load_params_any(path: str, step: int | None = None) -> Params:
  """Params of a workdir (directory: latest or `step`) or an `.npz` file."""
  if epath.Path(path).is_dir():
    return checkpoint.load_params(path, step)
  if step is not None:
    raise ValueError(f'step={step} only applies to a workdir; {path} is a file.')
  return checkpoint.load_npz(path)


def _num_classes(params: Params, source: str) -> int:
  head = params.get('head')
  if not head or 'kernel' not in head:
    raise ValueError(f'{source} has no classification head (`head/kernel`); '
                     'it is a feature extractor and cannot name classes.')
  return int(head['kernel'].shape[-1])


def _input_channels(params: Params, source: str) -> int:
  for name in _INPUT_LAYERS:
    kernel = params.get(name, {}).get('kernel')
    if kernel is not None and kernel.ndim == 4:
      return int(kernel.shape[2])
  raise ValueError(f'{source}: none of {_INPUT_LAYERS} holds a conv kernel, so '
                   'the input channels are unknown.')


def numbered_class_names(num_classes: int) -> tuple[str, ...]:
  """'0', '1', ...: the names used when the real ones are unknown."""
  return tuple(str(i) for i in range(num_classes))


def read_class_names(path: str, num_classes: int) -> tuple[str, ...]:
  """One name per line (blank lines ignored); must match the head size."""
  file = epath.Path(path)
  if not file.exists():
    raise FileNotFoundError(f'No class names file at {path}')
  names = tuple(line.strip() for line in file.read_text().splitlines()
                if line.strip())
  if len(names) != num_classes:
    raise ValueError(f'{path} lists {len(names)} class names but the model '
                     f'has {num_classes} classes.')
  return names


def check_params_fit(model: nn.Module, params: Params,
                     image_shape: tuple[int, int, int], source: str,
                     hint: str = '') -> None:
  """Raises ValueError naming every tensor that `model` would not accept.

  Compares names and shapes with the model's own (abstract, nothing is
  computed) init at `image_shape`; a position embedding of another length
  means another image size.
  """
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0),
                         jnp.zeros((1, *image_shape), jnp.float32),
                         train=False))['params']
  want = {k: v.shape for k, v in
          traverse_util.flatten_dict(abstract, sep='/').items()}
  have = {k: np.shape(v) for k, v in
          traverse_util.flatten_dict(params, sep='/').items()}
  problems = [f'  {k}: checkpoint {have[k]} vs model {want[k]}'
              for k in want if k in have and have[k] != want[k]]
  problems += [f'  missing: {k} {want[k]}' for k in want if k not in have]
  problems += [f'  unexpected: {k} {have[k]}' for k in have if k not in want]
  if problems:
    more = f'\n  ... and {len(problems) - 12} more' if len(problems) > 12 else ''
    raise ValueError(
        f'{source} does not fit the model at {image_shape[0]} px'
        + (f' ({hint})' if hint else '') + ':\n'
        + '\n'.join(problems[:12]) + more)


# ---------------------------------------------------------------- images


def define_max_image_pixels_flag(fv: flags.FlagValues) -> None:
  """`--max_image_pixels`, the limit `read_image` applies, for the tools that
  read image files."""
  flags.DEFINE_integer(
      'max_image_pixels', pixel_limit.DEFAULT_MAX_IMAGE_PIXELS,
      'Refuse an image whose header claims more pixels (width x height) than '
      'this, before decoding it (a guard against decompression bombs); raise '
      'it for trusted large images.', lower_bound=1, flag_values=fv)


def read_image(path: str, max_pixels: int = pixel_limit.DEFAULT_MAX_IMAGE_PIXELS
               ) -> np.ndarray:
  """Decodes a PNG/JPEG/GIF/BMP file to uint8 [H, W, C], C in (1, 3, 4).

  Grayscale with alpha is returned as grayscale. Raises FileNotFoundError or
  ValueError naming the file; an image of over `max_pixels` pixels is refused
  from its header, before anything is decoded.
  """
  file = epath.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f'No image file at {path}')
  pixel_limit.check_pixel_limit(path, max_pixels, '--max_image_pixels')
  try:
    image = tf.io.decode_image(file.read_bytes(), expand_animations=False)
  except tf.errors.OpError as e:
    reason = re.sub(r'\{\{.*?\}\}|\[Op:\w+\]', '', e.message).strip()
    raise ValueError(f'Cannot decode image {path}: not a readable PNG, JPEG, '
                     f'GIF or BMP file ({reason})') from None
  image = image.numpy()
  if image.shape[-1] == 2:
    image = image[..., :1]
  return image
