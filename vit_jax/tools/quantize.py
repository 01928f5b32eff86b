"""Post-training int8 quantization of a trained model, to one `.npz`.

    python -m vit_jax.tools.quantize --workdir=runs/quickstart --out=q.npz
    python -m vit_jax.tools.quantize --workdir=runs/quickstart --out=q.npz \\
        --activations=static --calibration_examples=512
    python -m vit_jax.tools.quantize --checkpoint=ViT-B_16.npz --model=ViT-B_16 \\
        --image_size=224 --out=ViT-B_16-int8.npz

Every matmul kernel the rules select becomes per-channel symmetric int8
(vit_jax.quantization: which products always stay float, and why). Settings
default to the run's `config.quantization` (a QAT run's are what it trained
with) and the flags override them. `--activations=static` calibrates the
activation scales on the first `--calibration_examples` training examples,
preprocessed as in evaluation, from the workdir's dataset (or `--config`'s for
a --checkpoint file). A scanned model is unrolled first.

The file (vit_jax.checkpoint.quantized) names its model and input, so
`evaluate --checkpoint=q.npz`, `predict --checkpoint=q.npz` and
`benchmark --quantized=q.npz` take it alone. The tool prints what it
quantized, the file's size and its ratio to the float export.
"""

import json
import sys

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from configs import common
from vit_jax import data
from vit_jax import quantization
from vit_jax.checkpoint import quantized
from vit_jax.metrics import summarize_names
from vit_jax.tools import cli
from vit_jax.tools import loading

_SETTINGS = ('rules', 'head', 'activations', 'calibration_examples')


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  cli.define_model_flags(fv)
  config_flags.DEFINE_config_file(
      'config', None, 'Training config: the calibration data and default '
      "settings for a --checkpoint file (a workdir's own by default).",
      flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string('out', None, 'The int8 .npz to write.', flag_values=fv)
  flags.DEFINE_string('rules', None, 'Regex over module paths to quantize '
                      "(default: config.quantization.rules, '.*').",
                      flag_values=fv)
  flags.DEFINE_bool('head', None, 'Quantize the classifier head too.',
                    flag_values=fv)
  flags.DEFINE_enum('activations', None, quantization.ACTIVATIONS,
                    'int8 activations: scales per token at run time, '
                    'static from calibration, or none (weight-only).',
                    flag_values=fv)
  flags.DEFINE_integer('calibration_examples', None, 'Training examples that '
                       'calibrate static activation scales.', flag_values=fv)


def settings(fv: flags.FlagValues,
             config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """`config.quantization` (or the defaults) with the given flags applied."""
  base = config if config is not None and 'quantization' in config else (
      common.get_config())
  qcfg = ml_collections.ConfigDict(base.quantization)
  for key in _SETTINGS:
    if fv[key].value is not None:
      qcfg[key] = fv[key].value
  check = ml_collections.ConfigDict({'quantization': qcfg})
  quantization.check_config(check)
  return qcfg


def calibration_images(config: ml_collections.ConfigDict | None,
                       trained: loading.TrainedModel, count: int):
  """The first `count` training examples, eval-preprocessed at the model's
  input size, in batches of up to 256."""
  if config is None:
    raise ValueError('--activations=static calibrates on training data: give '
                     '--config (its dataset) with a --checkpoint file')
  config = ml_collections.ConfigDict(config)
  config.input.image_size, config.input.channels = (trained.image_size,
                                                    trained.channels)
  config.pp = trained.pp
  split = f'{config.input.train_split}[:{count}]'
  batch = min(count, 256)
  for b in data.eval_iterator(config, split, local_batch_size=batch):
    yield b['image'][b['mask']]


def main(fv: flags.FlagValues, args: list[str]) -> None:
  if args:
    raise ValueError(f'unexpected arguments {args}')
  if not fv.out:
    raise ValueError('--out=FILE.npz is required')
  cli.check_output_path(fv.out, 'out')
  if fv.checkpoint and quantized.is_quantized(fv.checkpoint):
    raise ValueError(f'{fv.checkpoint} is already int8; quantize the float '
                     'checkpoint it came from.')
  config = fv.config
  if config is None and fv.workdir:
    config = loading.saved_config(fv.workdir, fv.step)
  qcfg = settings(fv, config)
  trained = cli.load_model(fv)
  shape = (trained.image_size, trained.image_size, trained.channels)
  calibration = None
  if qcfg.activations == 'static':
    calibration = calibration_images(config, trained, qcfg.calibration_examples)
  _, qparams = quantization.quantize_params(trained.model, trained.params, qcfg,
                                            shape, calibration)
  meta = dict(
      quantization=qcfg.to_dict(), model=trained.model_config.to_dict(),
      image_size=trained.image_size, channels=trained.channels,
      class_names=list(trained.class_names), pp=trained.pp.to_dict(),
      source=trained.source,
      config=config.to_json_best_effort() if fv.workdir else None)
  size = quantized.save(fv.out, qparams, trained.params, meta)
  float_size = quantized.float_export_bytes(trained.params)
  modules = quantization.selected_modules(qcfg, trained.params)
  print(f'int8 ({qcfg.activations} activations): {len(modules)} modules: '
        f'{summarize_names(modules)}')
  print(json.dumps({'out': fv.out, 'bytes': size, 'float_bytes': float_size,
                    'ratio': round(size / float_size, 4),
                    'int8_modules': len(modules),
                    'params': int(sum(np.size(v) for v in
                                      jax.tree.leaves(trained.params)))}))


if __name__ == '__main__':
  sys.exit(cli.run(define_flags, main, doc=__doc__))
