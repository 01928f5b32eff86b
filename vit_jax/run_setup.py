"""Setting up a training run from its config: every check once, then the parts.

`check_config` is the start of every run and of every tool that builds what a
run builds: each group of keys is checked by the module that reads it (the
optimizer's by vit_jax.optim, the input's by vit_jax.data, ...), in an order
where a check only relies on keys checked before it. It reads the config
alone, so a bad value costs seconds, not a compile.

`build` is the one sequence model -> optimizer -> abstract train state ->
parameter and sharding rules checked against the model's names -> state
shardings, which the trainer and the benchmark both run, so that they time
and train the same program. Nothing in it compiles or allocates a parameter.
"""

import dataclasses
import functools
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import optax

from vit_jax import config_checks
from vit_jax import config_keys
from vit_jax import data
from vit_jax import evaluation
from vit_jax import fewshot
from vit_jax import mixup
from vit_jax import models
from vit_jax import optim
from vit_jax import parallel
from vit_jax import param_rules
from vit_jax import pruning
from vit_jax import quantization
from vit_jax import sharding
from vit_jax import steps
from vit_jax.checkpoint import best
from vit_jax.checkpoint import pretrained
from vit_jax.config_checks import require


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad key of a training config."""
  config_keys.check_config(config)  # No key of the earlier flat layout.
  _check_run_keys(config)
  data.check_config(config)
  models.check_config(config.model, config.input.image_size)
  optim.check_config(config)
  mixup.check_mixup(config.mixup)
  steps.check_config(config)
  parallel.check_config(config)
  sharding.check_config(config)
  pretrained.check_config(config)
  quantization.check_config(config)
  fewshot.check_config(config)
  best.check_config(config, evaluation.metric_names(config)
                    + fewshot.metric_names(config))
  pruning.check_config(config)


def _check_run_keys(config: ml_collections.ConfigDict) -> None:
  """The loop's own keys: batch sizes, duration, cadence, seed."""
  for key in ('batch_size', 'log_every', 'eval_every', 'checkpoint_every',
              'eval.batch_size', 'checkpoint.keep'):
    config_checks.positive_int(config_keys.lookup(config, key), key)
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


@dataclasses.dataclass(frozen=True)
class RunParts:
  """What a train step is built from; see `build`.

  Attributes:
    model: the flax Module of `config.model` with `num_classes` outputs.
    tx: the optimizer chain; `schedule` its step -> learning rate.
    image_shape: (size, size, channels) of one input image.
    init_fn: () -> the initial TrainState; run it under
      `jax.jit(init_fn, out_shardings=state_sharding)` to create it in place.
    state_sharding: a NamedSharding per TrainState leaf (vit_jax.sharding).
    abstract_state: the TrainState as ShapeDtypeStructs carrying those
      shardings: the target of a restore and of `lower`.
  """
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  image_shape: tuple[int, int, int]
  init_fn: Callable[[], steps.TrainState]
  state_sharding: Any
  abstract_state: Any


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
          num_classes: int, total_steps: int) -> RunParts:
  """Model, optimizer and sharded abstract state of a checked `config`.

  The parameter rules and the sharding rules are checked against the model's
  real parameter names here (a rule that selects nothing is an error), and
  what they decide is logged.
  """
  model = models.create_model(config.model, num_classes)
  if config.quantization.qat:  # Same params; int8 rounding in the products.
    model = quantization.qat_model(model, config.quantization)
  tx, schedule = optim.make_optimizer(config, total_steps)
  size, channels = config.input.image_size, config.input.channels
  image_shape = (size, size, channels)
  init_fn = functools.partial(steps.create_train_state, model, tx, image_shape,
                              config.seed, ema=config.train.ema_decay > 0)
  abstract_state = jax.eval_shape(init_fn)
  param_rules.check_rules_select(config, abstract_state.params)
  pruning.check_rules_select(config, abstract_state.params)
  if config.quantization.qat:
    quantization.check_rules_select(config.quantization, abstract_state.params)
  if config.optim.frozen or config.optim.lr_mults or config.optim.layer_decay != 1:
    logging.info(param_rules.describe_param_rules(config, abstract_state.params))
  # Optimizer state follows its parameter (vit_jax.sharding).
  state_sharding = sharding.from_config(config, abstract_state, mesh)
  logging.info(sharding.describe(state_sharding, abstract_state.params))
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_sharding)
  return RunParts(model=model, tx=tx, schedule=schedule, image_shape=image_shape,
                  init_fn=init_fn, state_sharding=state_sharding,
                  abstract_state=abstract_state)
