"""Train state and the pure, jit-able train and eval steps.

`make_train_step` returns `step(state, batch) -> (state, metrics)` for either
parallelism mode (see vit_jax.parallel); `make_eval_step` returns
`step(params, batch) -> sums` of loss / top-1 / top-5 / count over the batch's
unmasked examples, so that summing over batches gives exact split metrics.
"""

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vit_jax import optim
from vit_jax import parallel

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position (= `step`).

  `rng` is raw uint32 key data, so checkpoints hold plain arrays; the key for a
  step is `fold_in(rng, step)`, which makes a resumed run draw the same dropout.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: tuple[int, ...], seed: int) -> TrainState:
  """Initial state; run under `jax.jit(..., out_shardings=...)` to init in place."""
  init_rng, train_rng = jax.random.split(jax.random.key(seed))
  params = model.init(init_rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32),
                      train=False)['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params),
                    rng=jax.random.key_data(train_rng))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *,
                    num_classes: int, label_smoothing: float = 0.0,
                    accum_steps: int = 1,
                    parallelism: str = 'jit') -> Callable[[TrainState, Batch],
                                                          tuple[TrainState, Metrics]]:
  """The update step: loss, (accumulated) gradients, optimizer update.

  In 'shard_map' mode the body runs per device: each device folds its index into
  the dropout key and gradients/metrics are averaged with `pmean` over `data`.
  """
  if parallelism not in parallel.PARALLELISMS:
    raise ValueError(f'parallelism {parallelism!r} not in {parallel.PARALLELISMS}')
  per_device = parallelism == 'shard_map'

  def loss_fn(params, batch, rng):
    logits = model.apply({'params': params}, batch['image'], train=True,
                         rngs={'dropout': rng})
    loss = optim.cross_entropy_loss(logits, batch['label'], num_classes,
                                    label_smoothing=label_smoothing)
    return loss, {}

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if per_device:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(parallel.DATA_AXIS))
    loss, _, grads = optim.accumulate_gradients(
        grad_fn, state.params, batch, rng, accum_steps)
    if per_device:
      loss, grads = parallel.pmean_if_sharded((loss, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'train_loss': loss, 'grad_norm': optax.global_norm(grads)}
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state)
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
