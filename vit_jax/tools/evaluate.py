"""Top-1, top-5 and loss of a checkpoint on any split, without training.

    python -m vit_jax.tools.evaluate --config=configs/quickstart.py \\
        --checkpoint=runs/quickstart --split=test,train[:5000]
    python -m vit_jax.tools.evaluate --config=configs/vit_b16.py \\
        --checkpoint=imagenet21k+imagenet2012_ViT-B_16.npz --split=validation \\
        --json_out=eval.json
    python -m vit_jax.tools.evaluate --checkpoint=runs/quickstart  # saved config

`--checkpoint` is a train.py workdir (latest or `--step`) or an `.npz` in any
layout `checkpoint.load_npz` reads, holding a model of the config's
`model` with a head for the config's dataset (a file whose pruned heads were
dropped gives its own head counts), or an int8 file of
vit_jax.tools.quantize (which names its own model). Without `--config` a
workdir's (or an int8 file's) saved config is used. Config values can be overridden as in train.py
(`--config.eval.batch_size=512`, `--config.input.data_dir=...`). The numbers come from
vit_jax.evaluation's `evaluate` and the trainer's eval step: every example of the split counted
once, over every device. Prints the metrics as JSON.
"""

import json
import sys
from typing import Any

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags

from vit_jax import config_keys
from vit_jax import data
from vit_jax import evaluation
from vit_jax import models
from vit_jax import parallel
from vit_jax import steps
from vit_jax.checkpoint import quantized
from vit_jax.models import head_counts
from vit_jax.tools import cli
from vit_jax.tools import loading


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  config_flags.DEFINE_config_file(
      'config', None, 'Training config file (see configs/); default: the '
      "--checkpoint workdir's saved config.", flag_values=fv, lock_config=True,
      sys_argv=argv)
  flags.DEFINE_string('checkpoint', None, 'A workdir or an .npz file.',
                      flag_values=fv)
  cli.define_step_flag(fv, 'Checkpoint step of a workdir (default: the '
                       'latest).')
  flags.DEFINE_string('split', None, "Split(s) to evaluate, comma-separated, "
                      "e.g. 'test' or 'train[:10%],test' (default: the "
                      "config's eval_splits).", flag_values=fv)
  flags.DEFINE_string('json_out', None, 'Also write the metrics to this JSON '
                      'file.', flag_values=fv)


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint_path: str,
                        *, splits: list[str] | None = None,
                        step: int | str | None = None) -> dict[str, float]:
  """`eval_<split>_{top1,top5,loss,count}` of the checkpoint on each split."""
  # An old key would otherwise be ignored silently (its section's default used).
  config_keys.check_config(config)
  config = ml_collections.ConfigDict(config)  # A copy: the eval splits change.
  if splits:
    config.eval.splits = ','.join(splits)
  data.check_config(config)
  models.check_config(config.model, config.input.image_size)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.eval.batch_size, mesh)
  info = data.get_dataset_info(config)  # Fails on a missing dataset or split.
  if quantized.is_quantized(checkpoint_path):
    model, params = _int8_model(checkpoint_path, step, config, info.num_classes)
  else:
    params = loading.load_params_any(checkpoint_path, step)
    model = models.create_model(config.model, info.num_classes,
                                **head_counts.heads_from_params(params))
    loading.check_params_fit(
        model, params, (config.input.image_size, config.input.image_size,
                        config.input.channels),
        checkpoint_path, hint=f'config model {config.model.name} with '
        f'{info.num_classes} classes of {config.dataset}')
  replicated = parallel.replicated(mesh)
  params = jax.device_put(params, replicated)
  eval_step = steps.jit_eval_step(model, num_classes=info.num_classes,
                                  mesh=mesh, params_sharding=replicated)
  results: dict[str, float] = {}
  for split in data.eval_splits(config):
    results.update(evaluation.evaluate(eval_step, params, config, split, mesh))
  return results


def _int8_model(path: str, step: int | None, config: ml_collections.ConfigDict,
                num_classes: int) -> tuple[Any, Any]:
  """The PTQ model and params of an int8 file (it names its own model),
  refused if it cannot take the config's input or classes."""
  if step is not None:
    raise ValueError(f'--step applies to a workdir; {path} is an int8 file.')
  trained = loading.load_quantized(path)
  shape = (config.input.image_size, config.input.channels)
  if shape != (trained.image_size, trained.channels) or (
      trained.num_classes != num_classes):
    raise ValueError(
        f'{path} takes {trained.image_size} px x {trained.channels} channels '
        f'into {trained.num_classes} classes; the config gives {shape[0]} px x '
        f'{shape[1]} channels of {config.dataset} with {num_classes} classes.')
  return trained.model, trained.params


def main(fv: flags.FlagValues, args: list[str]) -> None:
  if args:
    raise ValueError(f'unexpected arguments {args}')
  if not fv.checkpoint:
    raise ValueError('--checkpoint (a workdir or an .npz file) is required')
  if fv.json_out:
    cli.check_output_path(fv.json_out, 'json_out')
  config = fv.config
  if config is None:
    config = loading.saved_config(fv.checkpoint, fv.step)
  splits = [s.strip() for s in fv.split.split(',')] if fv.split else None
  results = evaluate_checkpoint(config, fv.checkpoint, splits=splits,
                                step=fv.step)
  report: dict[str, Any] = dict(results, checkpoint=fv.checkpoint,
                                dataset=config.dataset)
  text = json.dumps(report, indent=2, sort_keys=True)
  print(text)
  if fv.json_out:
    with open(fv.json_out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  sys.exit(cli.run(define_flags, main, doc=__doc__))
