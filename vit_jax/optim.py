"""Optimizer, learning-rate schedule, loss and gradient accumulation.

Everything here is a pure function of the config (or of arrays), so the trainer can
build the optimizer once and call the loss and accumulation helpers inside `jit`.
`check_config` is the one check of the keys the optimizer and schedule read;
the builders take a config that passed it.

Which parameters weight decay, freezing and lr multipliers apply to is data: regexes
over parameter paths, see vit_jax.param_rules.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit_jax import config_checks
from vit_jax import param_rules
from vit_jax import pruning
from vit_jax.config_checks import require
from vit_jax.param_rules import regex_mask
from vit_jax.param_rules import scale_by_lr_multipliers

PyTree = Any

# The decay after warmup, as a function of (base, end, frac = fraction of the
# decay done, after = steps since warmup, tau = rsqrt timescale).
_DECAYS = {
    'cosine': lambda base, end, frac, after, tau: (
        end + (base - end) * 0.5 * (1.0 + jnp.cos(math.pi * frac))),
    'linear': lambda base, end, frac, after, tau: base + (end - base) * frac,
    'rsqrt': lambda base, end, frac, after, tau: (
        base * jnp.sqrt(tau / (jnp.maximum(after, 0.0) + tau))),
    'constant': lambda base, end, frac, after, tau: jnp.full_like(frac, base),
}
SCHEDULES = tuple(_DECAYS)


def _sgd(opt: ml_collections.ConfigDict, acc_dtype: Any) -> list[Any]:
  if not opt.momentum:
    return []
  return [optax.trace(decay=opt.momentum, nesterov=opt.nesterov,
                      accumulator_dtype=acc_dtype)]


def _adam(opt: ml_collections.ConfigDict, acc_dtype: Any) -> list[Any]:
  return [optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps,
                              mu_dtype=acc_dtype)]


# `optim.name` -> the transformations that turn gradients into a direction
# (adam and adamw differ only in where the weight decay goes).
_UPDATE_DIRECTIONS = {'sgd': _sgd, 'adam': _adam, 'adamw': _adam}
OPTIMIZERS = tuple(_UPDATE_DIRECTIONS)
# rsqrt decay timescale without a warmup to take it from (config.schedule.timescale).
DEFAULT_RSQRT_TIMESCALE = 10_000


# --------------------------------------------------------------------------------
# The check of the keys read here.
# --------------------------------------------------------------------------------
def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad optimizer or schedule setting.

  Covers `optim.*` (with the syntax of the parameter rules) and `schedule.*`;
  which parameters the rules select (which parameters they select is checked against the
  model's params, vit_jax.param_rules.check_rules_select). Whether the warmup
  fits the run is checked by `make_schedule`, the first place that knows the
  run's length when it is given in epochs.
  """
  opt, schedule = config.optim, config.schedule
  config_checks.one_of(opt.name, OPTIMIZERS, 'optim.name')
  config_checks.one_of(schedule.name, SCHEDULES, 'schedule.name')
  for key in ('base_lr', 'warmup_steps'):
    config_checks.number(schedule[key], f'schedule.{key}')
  for key in ('grad_clip_norm', 'weight_decay'):
    config_checks.number(opt[key], f'optim.{key}')
  config_checks.finite_positive(schedule.base_lr, 'schedule.base_lr')
  require(schedule.warmup_steps >= 0, 'config.schedule.warmup_steps must be '
          f'>= 0, got {schedule.warmup_steps}')
  require(opt.grad_clip_norm >= 0, 'config.optim.grad_clip_norm must be >= 0 '
          f'(0 disables), got {opt.grad_clip_norm}')
  require(opt.weight_decay >= 0,
          f'config.optim.weight_decay must be >= 0, got {opt.weight_decay}')
  require(not (opt.name == 'sgd' and opt.nesterov and not opt.momentum),
          'config.optim.nesterov needs config.optim.momentum > 0')
  param_rules.check_rule_syntax(config)


# --------------------------------------------------------------------------------
# Learning-rate schedule.
# --------------------------------------------------------------------------------
def make_schedule(config: ml_collections.ConfigDict,
                  total_steps: int) -> optax.Schedule:
  """Returns step -> learning rate: linear warmup from 0, then `config.schedule.name`.

  Reads `config.lr.{base, schedule, warmup_steps, end_value}` and, for 'rsqrt'
  without warmup, `config.schedule.timescale`.
    cosine:   half cosine from base (at warmup end) to end_value (at total_steps).
    linear:   straight line from base to end_value over the same span.
    rsqrt:    base * sqrt(tau / (step - warmup + tau)), tau = warmup_steps if > 0
              (the Transformer's base * sqrt(warmup / step)), else timescale.
    constant: base.
  Steps past total_steps keep the end value.

  Raises:
    ConfigError: the warmup is longer than the run (`total_steps`, given or
      derived from `total_epochs`).
  """
  lr = config.schedule
  decay, base = _DECAYS[lr.name], float(lr.base_lr)
  warmup, end = int(lr.warmup_steps), float(lr.end_lr)
  require(warmup <= total_steps, f'config.schedule.warmup_steps {warmup} exceeds '
          f'config.total_steps {total_steps} (the length of the run)')
  decay_steps = max(total_steps - warmup, 1)
  tau = float(warmup or lr.get('timescale', DEFAULT_RSQRT_TIMESCALE))

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    after = step - warmup  # Steps since warmup ended.
    frac = jnp.clip(after / decay_steps, 0.0, 1.0)
    value = decay(base, end, frac, after, tau)
    if warmup:
      value = jnp.where(step < warmup, base * step / warmup, value)
    return value

  return schedule


# --------------------------------------------------------------------------------
# Optimizer.
# --------------------------------------------------------------------------------
def make_optimizer(
    config: ml_collections.ConfigDict,
    total_steps: int,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer chain and returns it with its lr schedule.

  Chain, in order: global-norm clipping (`grad_clip_norm`, 0 disables) -> the
  optimizer's update direction (`optim.name`) -> weight decay -> scaling by
  -schedule(step) -> per-parameter lr factors -> pruning (`config.pruning`,
  vit_jax.pruning: last, after the frozen split too, so that the params after
  the update are exactly masked). The trainer logs `learning_rate` as
  `schedule(step)`, the base rate before the factors.

  Parameter rules (regexes over '/'-joined paths, see vit_jax.param_rules):
    frozen: matching params get zero updates. They are split off before the
      chain (optax.multi_transform), so they hold no optimizer state, take no
      weight decay and do not count in the clipping norm.
    lr_mults: ((regex, factor), ...), first match wins; the factor scales the
      final update, i.e. that parameter's learning rate (and its decoupled decay).
    layer_decay: factor layer_decay ** (top - depth) per parameter (`layer_ids`).

  Weight decay (`weight_decay`, on params whose path fully matches `wd_mask`):
    sgd, adamw: decoupled and multiplied by the learning rate (AdamW, Loshchilov &
      Hutter): p <- p - lr * (update + wd * p). Note that big_vision's `wd` is not
      multiplied by the base lr: its wd=1e-4 at lr=1e-3 is weight_decay=0.1 here.
    adam: coupled L2 (as torch.optim.Adam): wd * p is added to the gradient before
      the moment estimates, so it is rescaled by Adam like any gradient.
  `optim.accumulator_dtype` sets the dtype of sgd's momentum buffer and of Adam's
  first moment ('bfloat16' halves their memory); the second moment stays float32.

  Args:
    config: the training config (see configs/common.py), checked by
      `check_config`.
    total_steps: length of the run, for the schedule.
  """
  opt = config.optim
  direction = _UPDATE_DIRECTIONS[opt.name]
  clip, wd = float(config.optim.grad_clip_norm), float(config.optim.weight_decay)
  acc_dtype = jnp.dtype(opt.accumulator_dtype)

  schedule = make_schedule(config, total_steps)
  decay = optax.add_decayed_weights(
      wd, mask=lambda p: regex_mask(p, config.optim.wd_mask)) if wd > 0 else None

  chain = []
  if clip > 0:
    chain.append(optax.clip_by_global_norm(clip))
  if opt.name == 'adam' and decay is not None:
    chain.append(decay)  # Coupled L2: before the moments.
    decay = None
  chain += direction(opt, acc_dtype)
  if decay is not None:
    chain.append(decay)  # Decoupled: after the update direction, scaled by lr.
  chain.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*chain)
  if config.optim.frozen:
    frozen = config.optim.frozen
    tx = optax.multi_transform(
        {'train': tx, 'frozen': optax.set_to_zero()},
        lambda p: jax.tree_util.tree_map(lambda f: 'frozen' if f else 'train',
                                         regex_mask(p, frozen)))
  if config.optim.lr_mults or config.optim.layer_decay != 1:
    # After the split: the factors see the whole tree, so depths stay right
    # when whole blocks are frozen.
    tx = optax.chain(tx, scale_by_lr_multipliers(config.optim.lr_mults,
                                                 config.optim.layer_decay))
  if config.get('pruning') and config.pruning.method != 'none':
    tx = optax.chain(tx, pruning.prune(config.pruning, total_steps))
  return tx, schedule


# --------------------------------------------------------------------------------
# Loss.
# --------------------------------------------------------------------------------
def one_hot_smoothed(labels: jax.Array, num_classes: int,
                     smoothing: float = 0.0) -> jax.Array:
  """Returns float32 targets [..., num_classes] with label smoothing.

  The true class gets 1 - smoothing + smoothing / num_classes and every other class
  smoothing / num_classes, so each row still sums to 1 (Szegedy et al. 2016).
  `labels` are int class ids [...] or already-soft targets [..., num_classes]
  (e.g. from mixup), which are smoothed the same way.
  """
  if not 0.0 <= smoothing < 1.0:
    raise ValueError(f'label smoothing must be in [0, 1), got {smoothing}.')
  labels = jnp.asarray(labels)
  if jnp.issubdtype(labels.dtype, jnp.integer):
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  else:
    targets = labels.astype(jnp.float32)
  return targets * (1.0 - smoothing) + smoothing / num_classes


def cross_entropy_loss(logits: jax.Array, labels: jax.Array, num_classes: int,
                       label_smoothing: float = 0.0,
                       mask: jax.Array | None = None) -> jax.Array:
  """Mean softmax cross-entropy over the examples where `mask` is true.

  Args:
    logits: [batch, num_classes], any float dtype; the log-softmax runs in float32
      so bfloat16 logits do not lose the loss to rounding.
    labels: int [batch] (or soft targets [batch, num_classes]).
    num_classes: size of the label space.
    label_smoothing: see `one_hot_smoothed`.
    mask: optional [batch] bool/0-1 weights; padding examples (an eval batch
      filled up to a fixed size) get 0 and do not count in the mean.
  Returns:
    A float32 scalar; 0 if every example is masked out.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  targets = one_hot_smoothed(labels, num_classes, label_smoothing)
  per_example = -jnp.sum(targets * logp, axis=-1)
  if mask is None:
    return jnp.mean(per_example)
  weights = jnp.asarray(mask, jnp.float32)
  return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


# --------------------------------------------------------------------------------
# Gradient accumulation.
# --------------------------------------------------------------------------------
def _split_micro_batches(batch: PyTree, accum_steps: int) -> PyTree:
  """[batch, ...] -> [accum_steps, batch // accum_steps, ...], strided.

  Micro-batch i holds examples i, i + accum_steps, i + 2 * accum_steps, ... . The
  leading (sharded) batch axis becomes the micro-batch axis, so under a
  data-parallel sharding every micro-batch stays spread over all devices instead
  of living on a few of them.
  """
  sizes = {x.shape[0] for x in jax.tree_util.tree_leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(f'batch leaves disagree on the batch size: {sorted(sizes)}.')
  size = sizes.pop()
  if size % accum_steps:
    raise ValueError(f'batch size {size} is not divisible by accum_steps '
                     f'{accum_steps}.')
  return jax.tree_util.tree_map(
      lambda x: jnp.swapaxes(
          x.reshape((size // accum_steps, accum_steps) + x.shape[1:]), 0, 1),
      batch)


def accumulate_gradients(
    loss_and_grad_fn: Callable[[PyTree, PyTree, jax.Array],
                               tuple[tuple[jax.Array, PyTree], PyTree]],
    params: PyTree,
    batch: PyTree,
    rng: jax.Array,
    accum_steps: int,
) -> tuple[jax.Array, PyTree, PyTree]:
  """Averages loss, aux and gradients over `accum_steps` micro-batches.

  Lets a step see a batch larger than fits in memory: the micro-batches run one
  after another inside a `lax.scan`, so the compiled program (and compile time)
  does not grow with accum_steps.

  Args:
    loss_and_grad_fn: (params, micro_batch, rng) -> ((loss, aux), grads), i.e.
      `jax.value_and_grad(loss_fn, has_aux=True)` of a loss_fn(params, batch, rng)
      -> (scalar mean loss, aux pytree of arrays). aux is averaged like the loss,
      so it should hold per-micro-batch means (e.g. accuracy), not sums.
    params: the params tree.
    batch: pytree (e.g. dict) of arrays sharing a leading batch dimension.
    rng: PRNG key; micro-batch i gets `jax.random.fold_in(rng, i)` (with
      accum_steps == 1 the function is called once with `rng` itself).
    accum_steps: number of micro-batches; must divide the batch size.
  Returns:
    (loss, aux, grads), each the mean over micro-batches. With equal micro-batch
    sizes this equals the full-batch mean loss and its gradient.
  """
  if accum_steps < 1:
    raise ValueError(f'accum_steps must be >= 1, got {accum_steps}.')
  if accum_steps == 1:
    (loss, aux), grads = loss_and_grad_fn(params, batch, rng)
    return loss, aux, grads

  micro = _split_micro_batches(batch, accum_steps)
  first = jax.tree_util.tree_map(lambda x: x[0], micro)
  shapes = jax.eval_shape(loss_and_grad_fn, params, first, rng)
  # Sum in float32 at least, so bfloat16 gradients do not lose the small terms.
  zeros = jax.tree_util.tree_map(
      lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), shapes)

  def body(total, xs):
    i, micro_batch = xs
    out = loss_and_grad_fn(params, micro_batch, jax.random.fold_in(rng, i))
    return jax.tree_util.tree_map(jnp.add, total, out), None

  total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
  (loss, aux), grads = jax.tree_util.tree_map(
      lambda x, s: (x / accum_steps).astype(s.dtype)
      if jnp.issubdtype(s.dtype, jnp.floating) else x / accum_steps, total, shapes)
  return loss, aux, grads
