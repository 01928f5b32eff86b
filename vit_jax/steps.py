"""Train state and the pure, jit-able train and eval steps.

`make_train_step` returns `step(state, batch) -> (state, metrics)` for either
parallelism mode (see vit_jax.parallel); `make_eval_step` returns
`step(params, batch) -> sums` of loss / top-1 / top-5 / count over the batch's
unmasked examples, so that summing over batches gives exact split metrics.

Non-finite values are caught inside the compiled step, without a host sync:
every step checks its loss and gradient norm and records the first bad step and
a count in the state, which the loop reads only where it syncs anyway (log,
eval and checkpoint steps). See `NAN_POLICIES`.
"""

from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vit_jax import config_checks
from vit_jax import mixup as mixup_lib
from vit_jax import optim
from vit_jax import parallel
from vit_jax import pruning
from vit_jax.config_checks import require

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# What a step does when its loss or gradient norm is NaN/Inf:
#   'stop':      apply it anyway; the loop stops the run at its next check,
#                before logging or saving anything computed after that step.
#   'skip_step': leave params and optimizer state as they were (the step
#                counter and data position still advance) and count it.
NAN_POLICIES = ('stop', 'skip_step')
# Folded into a micro-batch's key for the `favor` rng stream (random features).
FAVOR_STREAM = 0x46415652


def check_config(config: Any) -> None:
  """Raises ConfigError naming the first bad setting of the train step.

  The `train` section: `accum_steps` (which must divide `batch_size`),
  `label_smoothing`, `parallelism`, `nan_policy` and `ema_decay`. `mixup` is
  checked by vit_jax.mixup, the batch against the devices by vit_jax.parallel.
  """
  train = config.train
  config_checks.positive_int(train.accum_steps, 'train.accum_steps')
  require(config.batch_size % train.accum_steps == 0,
          f'config.train.accum_steps {train.accum_steps} does not divide '
          f'config.batch_size {config.batch_size}')
  config_checks.number(train.label_smoothing, 'train.label_smoothing')
  require(0 <= train.label_smoothing < 1, 'config.train.label_smoothing must '
          f'be in [0, 1), got {train.label_smoothing}')
  config_checks.one_of(train.parallelism, parallel.PARALLELISMS,
                       'train.parallelism')
  config_checks.one_of(train.nan_policy, NAN_POLICIES, 'train.nan_policy')
  config_checks.number(train.ema_decay, 'train.ema_decay')
  require(0 <= train.ema_decay < 1, 'config.train.ema_decay must be in [0, 1) '
          f'(0 disables), got {train.ema_decay}')


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position (= `step`).

  `rng` is raw uint32 key data, so checkpoints hold plain arrays; the key for a
  step is `fold_in(rng, step)`, which makes a resumed run draw the same dropout.
  `first_nonfinite_step` (0 = none yet) and `nonfinite_steps` record steps whose
  loss or gradient norm was NaN/Inf; they live here, on device, so that noticing
  one costs no host sync per step and a resumed run keeps its count.
  `ema_params` is the moving average of `params` (see `ema_update`), or None
  when `ema_decay` is 0 (then it holds no arrays and checkpoints are unchanged).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  first_nonfinite_step: jax.Array
  nonfinite_steps: jax.Array
  ema_params: Any = None


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: tuple[int, ...], seed: int, *,
                       ema: bool = False) -> TrainState:
  """Initial state; run under `jax.jit(..., out_shardings=...)` to init in place.

  With `ema`, `ema_params` starts as a copy of the initial params (replace both
  when loading pre-trained params).
  """
  init_rng, train_rng = jax.random.split(jax.random.key(seed))
  params = model.init(init_rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32),
                      train=False)['params']
  zero = lambda: jnp.zeros((), jnp.int32)  # One buffer per leaf: all are donated.
  return TrainState(step=zero(), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(train_rng),
                    first_nonfinite_step=zero(), nonfinite_steps=zero(),
                    ema_params=jax.tree.map(jnp.copy, params) if ema else None)


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
  """One EMA step: ema <- decay * ema + (1 - decay) * params.

  Written as ema - (1 - decay) * (ema - params), which keeps the small
  increments of a decay close to 1 (e.g. 0.99996) in float32. No warm-up or
  bias correction: the average starts at the initial (or pre-trained) params,
  as timm's ModelEma does for DeiT.
  """
  return jax.tree.map(
      lambda e, p: e - (1.0 - decay) * (e - p.astype(e.dtype)), ema_params, params)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *,
                    num_classes: int, label_smoothing: float = 0.0,
                    accum_steps: int = 1,
                    parallelism: str = 'jit',
                    nan_policy: str = 'stop',
                    mixup: Mapping[str, Any] | None = None,
                    ema_decay: float = 0.0) -> Callable[[TrainState, Batch],
                                                       tuple[TrainState, Metrics]]:
  """The update step: loss, (accumulated) gradients, optimizer update.

  In 'shard_map' mode the body runs per device: each device folds its index into
  the dropout key and gradients/metrics are averaged with `pmean` over `data`.
  `nan_policy` (see NAN_POLICIES) decides whether a step with a non-finite loss
  or gradient norm is applied; with 'skip_step' the metrics add the running
  count `skipped_steps`. A skipped step does not advance the optimizer's own
  step count either, so its schedule runs that many steps behind the logged one.

  `mixup` (a `config.mixup` section, see vit_jax.mixup) mixes the whole batch
  once, before accumulation, with a key derived from the step's key; the loss
  then sees soft targets that already carry the label smoothing. `ema_decay` > 0
  updates `state.ema_params` after every applied step (the state must have been
  created with `ema=True`). The settings are those `check_config` checks.
  """
  per_device = parallelism == 'shard_map'
  skip_nonfinite = nan_policy == 'skip_step'
  use_mixup = mixup_lib.is_enabled(mixup)
  # Mixed targets already carry the smoothing.
  loss_smoothing = 0.0 if use_mixup else label_smoothing

  def loss_fn(params, batch, rng):
    # FAVOR+ draws its random features from their own stream (models/favor.py),
    # so that they do not depend on whether the model also has dropout.
    logits = model.apply({'params': params}, batch['image'], train=True,
                         rngs={'dropout': rng,
                               'favor': jax.random.fold_in(rng, FAVOR_STREAM)})
    loss = optim.cross_entropy_loss(logits, batch['label'], num_classes,
                                    label_smoothing=loss_smoothing)
    return loss, {}

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    if ema_decay and state.ema_params is None:
      raise ValueError('ema_decay > 0 needs a state created with ema=True')
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if use_mixup:  # Before the device index: every device draws the same mixing.
      batch = mixup_lib.mix_batch(
          mixup_lib.mixing_key(rng), batch, mixup, num_classes=num_classes,
          label_smoothing=label_smoothing,
          axis_name=parallel.DATA_AXIS if per_device else None)
    if per_device:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(parallel.DATA_AXIS))
    loss, _, grads = optim.accumulate_gradients(
        grad_fn, state.params, batch, rng, accum_steps)
    if per_device:
      loss, grads = parallel.pmean_if_sharded((loss, grads))
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = (ema_update(state.ema_params, params, ema_decay)
                  if ema_decay else state.ema_params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      params, opt_state, ema_params = jax.tree.map(
          lambda new, old: jnp.where(finite, new, old),
          (params, opt_state, ema_params),
          (state.params, state.opt_state, state.ema_params))
    step_number = state.step + 1  # 1-based, as the loop and the logs count.
    first_bad = jnp.where((state.first_nonfinite_step == 0) & ~finite,
                          step_number, state.first_nonfinite_step)
    new_state = state.replace(
        step=step_number, params=params, opt_state=opt_state,
        ema_params=ema_params, first_nonfinite_step=first_bad,
        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32))
    metrics = {'train_loss': loss, 'grad_norm': grad_norm}
    pruned = pruning.pruned_fraction(new_state.opt_state)  # None: no pruning.
    if pruned is not None:
      metrics['pruned_fraction'] = pruned
    if skip_nonfinite:
      metrics['skipped_steps'] = new_state.nonfinite_steps
    return new_state, metrics

  return step


def make_eval_step(model: nn.Module, *, num_classes: int
                   ) -> Callable[[Any, Batch], Metrics]:
  """Per-batch sums of loss, top-1 and top-5 hits, and example count (masked)."""

  def step(params: Any, batch: Batch) -> Metrics:
    logits = model.apply({'params': params}, batch['image'], train=False)
    labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
    # top_k breaks ties towards the lower index, as argmax does: constant logits
    # score one class, not all of them.
    _, top = jax.lax.top_k(logits, min(5, num_classes))
    hits = top == labels[:, None]
    return {
        'loss': jnp.sum(losses * mask),
        'top1': jnp.sum(hits[:, 0] * mask),
        'top5': jnp.sum(jnp.any(hits, axis=1) * mask),
        'count': jnp.sum(mask),
    }

  return step


def jit_train_step(config: Any, model: nn.Module, tx: optax.GradientTransformation,
                   *, num_classes: int, mesh: jax.sharding.Mesh,
                   state_sharding: Any) -> Callable[[TrainState, Batch],
                                                    tuple[TrainState, Metrics]]:
  """The train step exactly as the trainer runs it, jitted but not yet lowered.

  One place builds it (config -> step -> shard_map wrapper -> jit with the state
  sharded by the rules, the batch over 'data', metrics replicated, the state
  donated) so the trainer and the benchmark tool time the same program.
  """
  step = make_train_step(
      model, tx, num_classes=num_classes,
      label_smoothing=config.train.label_smoothing,
      accum_steps=config.train.accum_steps, parallelism=config.train.parallelism,
      nan_policy=config.train.nan_policy, mixup=config.mixup,
      ema_decay=config.train.ema_decay)
  if config.train.parallelism == 'shard_map':
    step = parallel.shard_map_step(step, mesh)
  return jax.jit(step, in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                 out_shardings=(state_sharding, parallel.replicated(mesh)),
                 donate_argnums=0)


def jit_eval_step(model: nn.Module, *, num_classes: int, mesh: jax.sharding.Mesh,
                  params_sharding: Any) -> Callable[[Any, Batch], Metrics]:
  """The eval step as the trainer and the evaluate tool run it: params as
  `params_sharding` says, the batch over 'data', the sums replicated."""
  return jax.jit(make_eval_step(model, num_classes=num_classes),
                 in_shardings=(params_sharding, parallel.batch_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh))


def check_finite(state: TrainState, nan_policy: str) -> None:
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
        'config.schedule.base_lr, enable config.optim.grad_clip_norm, check the '
        "input data, or set config.train.nan_policy='skip_step' to skip such "
        'steps.')
