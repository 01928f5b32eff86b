"""Checks that run before anything expensive, each with a message saying what to change.

A bad config should cost seconds, not a compile or an hour in a queue. Every check
here reads only the config and the filesystem; dataset checks (channels, splits,
availability) live in vit_jax.data.get_dataset_info, batch/device checks in
vit_jax.parallel.
"""

import math
import os
import re
import uuid
from typing import Any

from etils import epath
import jax
import ml_collections

from vit_jax import mixup
from vit_jax.errors import ConfigError
from vit_jax import models
from vit_jax import parallel
from vit_jax import param_rules
from vit_jax import sharding
from vit_jax import steps
from vit_jax.data import preprocess
from vit_jax.data.info import eval_splits
from vit_jax.checkpoint.posemb import METHODS as POSEMB_RESIZE_METHODS

_OPTIMIZERS = ('sgd', 'adam', 'adamw')
_SCHEDULES = ('cosine', 'linear', 'rsqrt', 'constant')
# Config values that define the training stream: changing one between a run and
# its resume would silently produce a different run.
_RESUME_KEYS = ('batch_size', 'seed', 'dataset', 'train_split', 'accum_steps',
                'image_size', 'ema_decay')
# Keys added after checkpoints were written without them: the value those had.
_RESUME_DEFAULTS = {'ema_decay': 0.0}


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(config, key: str) -> None:
  value = config[key]
  _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
           f'config.{key} must be a positive integer, got {value!r}')


def _number(value: Any, key: str) -> None:
  _require(_is_number(value), f'config.{key} must be a number, got {value!r} '
           f'({type(value).__name__})')


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
    _number(config.total_epochs, 'total_epochs')
    _require(config.total_epochs > 0,
             f'config.total_epochs must be > 0, got {config.total_epochs}')
  _require(isinstance(config.seed, int) and not isinstance(config.seed, bool),
           f'config.seed must be an integer, got {config.seed!r}')
  _require(isinstance(config.dataset, str) and config.dataset.strip() != '',
           "config.dataset must be a dataset name (e.g. 'digits') or "
           f"'folder:/path', got {config.dataset!r}")
  _require(config.channels in (1, 3),
           f'config.channels must be 1 (grayscale) or 3 (RGB), got '
           f'{config.channels!r}')
  _require(isinstance(config.cpu_devices, int) and config.cpu_devices >= 0,
           f'config.cpu_devices must be an integer >= 0, got {config.cpu_devices!r}')
  _require(config.nan_policy in steps.NAN_POLICIES,
           f'config.nan_policy {config.nan_policy!r} not in {steps.NAN_POLICIES}')

  _require(config.optim.name in _OPTIMIZERS,
           f'config.optim.name {config.optim.name!r} not in {_OPTIMIZERS}')
  _require(config.lr.schedule in _SCHEDULES,
           f'config.lr.schedule {config.lr.schedule!r} not in {_SCHEDULES}')
  for key in ('base', 'warmup_steps'):
    _number(config.lr[key], f'lr.{key}')
  for key in ('grad_clip_norm', 'weight_decay', 'label_smoothing'):
    _number(config[key], key)
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
  try:  # Regex syntax of wd_mask, frozen, lr_mults; layer_decay's range.
    param_rules.check_param_rules(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _require(config.batch_size % config.accum_steps == 0,
           f'config.accum_steps {config.accum_steps} does not divide '
           f'config.batch_size {config.batch_size}')
  _require(config.parallelism in parallel.PARALLELISMS,
           f'config.parallelism {config.parallelism!r} not in '
           f'{parallel.PARALLELISMS}')
  try:  # Rule syntax, mesh sizes, shard_map compatibility (vit_jax.sharding).
    sharding.check_sharding(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    preprocess.check_pp(config.pp)
    mixup.check_mixup(config.mixup)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _number(config.ema_decay, 'ema_decay')
  _require(0 <= config.ema_decay < 1,
           f'config.ema_decay must be in [0, 1) (0 disables), got '
           f'{config.ema_decay}')
  _require(bool(eval_splits(config)), 'config.eval_splits is empty')

  try:
    models.create_model(config.model, 1)
    models.check_image_size(config.model, config.image_size)
  except ValueError as e:
    raise ConfigError(f'config.model / config.image_size: {e}') from None
  if config.pretrained_path:
    _require(epath.Path(config.pretrained_path).exists(),
             f'config.pretrained_path {config.pretrained_path} does not exist')
  _require(config.pretrained_posemb_resize in POSEMB_RESIZE_METHODS,
           f'config.pretrained_posemb_resize {config.pretrained_posemb_resize!r} '
           f'not in {POSEMB_RESIZE_METHODS}')


def split_name(split: str) -> str:
  """A metric-name-safe split name: 'train[98%:]' -> 'train_98pct'."""
  return re.sub(r'[^A-Za-z0-9]+', '_', split.replace('%', 'pct')).strip('_')


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` if its parent exists; raises if it cannot be written.

  Writability is tested by writing a file, not with os.access: that also holds
  for root (whom access() always allows), read-only mounts and object stores.
  """
  if not workdir:
    raise ConfigError('--workdir is required')
  path = epath.Path(workdir)
  if not path.exists():
    if not path.parent.exists():
      raise ConfigError(f'workdir {workdir}: parent directory {path.parent} does '
                        'not exist (create it, or pick another --workdir)')
    try:
      path.mkdir(exist_ok=True)  # Processes of one run may race to create it.
    except OSError as e:
      raise ConfigError(f'workdir {workdir} cannot be created ({e}); pick a '
                        'writable --workdir') from None
  if not path.is_dir():
    raise ConfigError(f'workdir {workdir} exists and is not a directory')
  probe = path / f'.write_probe_{uuid.uuid4().hex}'
  try:
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise ConfigError(f'workdir {workdir} is not writable ({e}); pick a '
                      'writable --workdir or fix its permissions') from None
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
  saved = lambda k: meta.get(k, _RESUME_DEFAULTS.get(k))
  changed = [f'{k}: checkpoint {saved(k)!r} vs config {current[k]!r}'
             for k in (*_RESUME_KEYS, 'model') if saved(k) != current[k]]
  if changed:
    raise ConfigError(
        'this workdir holds a checkpoint of a different run (' + '; '.join(changed)
        + '). Use a new --workdir, or restore the original values.')


def check_finite(state: Any, nan_policy: str) -> None:
  """With nan_policy 'stop': raises if any step so far had a NaN/Inf loss or
  gradient norm, naming the first one.

  The train step records that step in the state on device, so this one scalar
  read (made where the loop syncs anyway: log, eval and checkpoint steps) sees
  a bad step between two checks as well. The caller raises it before logging
  or saving, so no state computed after a bad step reaches a checkpoint.
  """
  if nan_policy != 'stop':
    return
  bad = int(jax.device_get(state.first_nonfinite_step))
  if bad:
    raise FloatingPointError(
        f'Non-finite loss or gradient norm at step {bad}; stopped without saving '
        f'any later state (the last good checkpoint is kept). Lower '
        'config.lr.base, enable config.grad_clip_norm, check the input data, or '
        "set config.nan_policy='skip_step' to skip such steps.")
