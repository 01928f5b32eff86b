"""Checks that run before anything expensive, each with a message saying what to change.

A bad config should cost seconds, not a compile or an hour in a queue. Every check
here reads only the config and the filesystem; dataset checks (channels, splits,
availability) live in vit_jax.data.get_dataset_info, batch/device checks in
vit_jax.parallel.
"""

import math
import os
import re
from typing import Any

from etils import epath
import ml_collections

from vit_jax import models
from vit_jax import parallel
from vit_jax.data import preprocess
from vit_jax.data.info import eval_splits

_OPTIMIZERS = ('sgd', 'adam', 'adamw')
_SCHEDULES = ('cosine', 'linear', 'rsqrt', 'constant')
# Config values that define the training stream: changing one between a run and
# its resume would silently produce a different run.
_RESUME_KEYS = ('batch_size', 'seed', 'dataset', 'train_split', 'accum_steps',
                'image_size')


class ConfigError(ValueError):
  """A config value that cannot work; the message says which key and why."""


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _positive_int(config, key: str) -> None:
  value = config[key]
  _require(isinstance(value, int) and value > 0,
           f'config.{key} must be a positive integer, got {value!r}')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad key of a training config."""
  for key in ('batch_size', 'accum_steps', 'log_every', 'eval_every',
              'checkpoint_every', 'keep_checkpoints', 'eval_batch_size',
              'image_size'):
    _positive_int(config, key)
  _require(config.total_steps is not None or config.total_epochs is not None,
           'set config.total_steps or config.total_epochs')
  if config.total_steps is not None:  # Steps win, so the command line can set them.
    _positive_int(config, 'total_steps')
  else:
    _require(config.total_epochs > 0,
             f'config.total_epochs must be > 0, got {config.total_epochs}')

  _require(config.optim.name in _OPTIMIZERS,
           f'config.optim.name {config.optim.name!r} not in {_OPTIMIZERS}')
  _require(config.lr.schedule in _SCHEDULES,
           f'config.lr.schedule {config.lr.schedule!r} not in {_SCHEDULES}')
  _require(math.isfinite(config.lr.base) and config.lr.base > 0,
           f'config.lr.base must be a positive number, got {config.lr.base}')
  _require(config.lr.warmup_steps >= 0,
           f'config.lr.warmup_steps must be >= 0, got {config.lr.warmup_steps}')
  if config.total_steps is not None:
    _require(config.lr.warmup_steps <= config.total_steps,
             f'config.lr.warmup_steps {config.lr.warmup_steps} exceeds '
             f'config.total_steps {config.total_steps}')
  _require(config.grad_clip_norm >= 0,
           f'config.grad_clip_norm must be >= 0 (0 disables), got '
           f'{config.grad_clip_norm}')
  _require(config.weight_decay >= 0,
           f'config.weight_decay must be >= 0, got {config.weight_decay}')
  _require(0 <= config.label_smoothing < 1,
           f'config.label_smoothing must be in [0, 1), got {config.label_smoothing}')
  try:
    re.compile(config.wd_mask)
  except re.error as e:
    raise ConfigError(f'config.wd_mask {config.wd_mask!r} is not a regex: {e}')
  _require(config.batch_size % config.accum_steps == 0,
           f'config.accum_steps {config.accum_steps} does not divide '
           f'config.batch_size {config.batch_size}')
  _require(config.parallelism in parallel.PARALLELISMS,
           f'config.parallelism {config.parallelism!r} not in '
           f'{parallel.PARALLELISMS}')
  try:
    preprocess.check_pp(config.pp)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _require(bool(eval_splits(config)), 'config.eval_splits is empty')

  try:
    models.create_model(config.model, 1)
    models.check_image_size(config.model, config.image_size)
  except ValueError as e:
    raise ConfigError(f'config.model / config.image_size: {e}') from None
  if config.pretrained_path:
    _require(epath.Path(config.pretrained_path).exists(),
             f'config.pretrained_path {config.pretrained_path} does not exist')


def split_name(split: str) -> str:
  """A metric-name-safe split name: 'train[98%:]' -> 'train_98pct'."""
  return re.sub(r'[^A-Za-z0-9]+', '_', split.replace('%', 'pct')).strip('_')


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` if its parent exists; raises if it cannot be written."""
  if not workdir:
    raise ConfigError('--workdir is required')
  path = epath.Path(workdir)
  if not path.exists():
    if not path.parent.exists():
      raise ConfigError(f'workdir {workdir}: parent directory {path.parent} does '
                        'not exist (create it, or pick another --workdir)')
    path.mkdir()
  if not path.is_dir():
    raise ConfigError(f'workdir {workdir} exists and is not a directory')
  if not str(path).startswith('gs://') and not os.access(path, os.W_OK | os.X_OK):
    raise ConfigError(f'workdir {workdir} is not writable')
  return os.fspath(path)


def resume_meta(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a checkpoint records so that a resume can check it is the same run."""
  meta = {key: config[key] for key in _RESUME_KEYS}
  meta['model'] = config.model.name
  meta['config'] = config.to_json_best_effort()
  return meta


def check_resume_meta(meta: dict[str, Any], config: ml_collections.ConfigDict) -> None:
  """Raises if the workdir's checkpoint was written by a different run."""
  current = resume_meta(config)
  changed = [f'{k}: checkpoint {meta.get(k)!r} vs config {current[k]!r}'
             for k in (*_RESUME_KEYS, 'model') if meta.get(k) != current[k]]
  if changed:
    raise ConfigError(
        'this workdir holds a checkpoint of a different run (' + '; '.join(changed)
        + '). Use a new --workdir, or restore the original values.')


def check_finite(scalars: dict[str, float], step: int) -> None:
  """Stops the run on a non-finite loss or gradient norm, naming the step."""
  bad = {k: v for k, v in scalars.items()
         if k in ('train_loss', 'grad_norm') and not math.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f'non-finite {bad} at step {step}; the last good checkpoint is kept. '
        'Lower config.lr.base, enable config.grad_clip_norm, or check the data.')
