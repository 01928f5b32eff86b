"""Setting up a training run from its config: every check, once.

`check_config` is the start of every run and of every tool that builds what a
run builds: each group of keys is checked by the module that reads it (the
optimizer's by vit_jax.optim, the input's by vit_jax.data, ...), in an order
where a check only relies on keys checked before it. Everything here reads
the config alone, so a bad value costs seconds, not a compile. What needs the
data, the devices or the model's parameter names is checked where those
first exist, still before anything compiles.
"""

import ml_collections

from vit_jax import config_checks
from vit_jax import data
from vit_jax import mixup
from vit_jax import models
from vit_jax import optim
from vit_jax import parallel
from vit_jax import sharding
from vit_jax import steps
from vit_jax.checkpoint import pretrained
from vit_jax.config_checks import require


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad key of a training config."""
  _check_run_keys(config)
  data.check_config(config)
  models.check_config(config.model, config.image_size)
  optim.check_config(config)
  mixup.check_mixup(config.mixup)
  steps.check_config(config)
  parallel.check_config(config)
  sharding.check_config(config)
  pretrained.check_config(config)


def _check_run_keys(config: ml_collections.ConfigDict) -> None:
  """The loop's own keys: batch sizes, duration, cadence, seed."""
  for key in ('batch_size', 'eval_batch_size', 'log_every', 'eval_every',
              'checkpoint_every', 'keep_checkpoints'):
    config_checks.positive_int(config[key], key)
  require(config.total_steps is not None or config.total_epochs is not None,
          'set config.total_steps or config.total_epochs')
  if config.total_steps is not None:  # Steps win, so the command line can set them.
    config_checks.positive_int(config.total_steps, 'total_steps')
  else:
    config_checks.number(config.total_epochs, 'total_epochs')
    require(config.total_epochs > 0,
            f'config.total_epochs must be > 0, got {config.total_epochs}')
  require(config_checks.is_int(config.seed),
          f'config.seed must be an integer, got {config.seed!r}')
