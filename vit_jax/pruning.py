"""Weight pruning as the last optax transformation: magnitude, N:M, whole heads.

No maintained JAX pruning library installs here, so this is written against
the optimizer chain directly. `prune(config.pruning, total_steps)` is appended
to the chain by vit_jax.optim.make_optimizer, after the lr scaling, the lr
multipliers and the frozen split: it sees the final update u of each parameter
p and returns u where the mask keeps p and -p where it prunes it, so after
`optax.apply_updates` a pruned weight is exactly 0 and a kept one exactly
p + u, whatever momentum, Adam's moments or weight decay would have done.

Methods (`config.pruning.method`; docs/compression.md):
  magnitude  per parameter, the round(s * size) smallest |w| are zeroed (ties:
             the lower flat index first), so the sparsity is exact.
  n_m        in every group of `m` consecutive weights along a kernel's input
             axis the `n` largest |w| are kept: axis 0 of Dense [in, out] and
             of attention query/key/value [hidden, heads, head_dim] kernels;
             (heads, head_dim) of attention `out` [heads, head_dim, hidden];
             all but the last axis of conv kernels [kh, kw, cin, cout]. A
             pattern, not a level: `sparsity` does not apply; the pattern is
             on from `begin_step`.
  heads      whole attention heads: per attention module, a head's score is
             the L2 norm of its query/key/value kernel and bias slices and its
             `out` kernel slice; the round(s * heads) lowest are zeroed (all
             those slices). The rule selects modules through their params.

Schedule (Zhu & Gupta 2017): s_t = s_f * (1 - (1 - (t - t0) / (t1 - t0))^3) for
t0 <= t <= t1, 0 before, s_f after, with t the step as the logs count it
(1 = the first update) and t0, t1 = `begin_step`, `end_step` (None: 3/4 of
total_steps). Masks are recomputed from |p + u| (the weights as the step
leaves them) at the first step of the span, every `update_every` steps from
t0 and at t1, and are fixed after t1. A pruned weight can come back at a
recompute only if its one-step update outgrows a kept weight.

State: `PruneState(count, masks, pruned_fraction)`. `masks` mirrors the params:
a bool array of the parameter's shape under each pruned parameter's path, so
vit_jax.sharding shards it like its parameter and Orbax saves it with the
optimizer state (a resumed run continues bitwise); others get a bool []
placeholder. Scanned encoders (`Transformer/encoderblock/...`, a leading
[num_layers] axis) are pruned per layer.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_jax import config_checks
from vit_jax import param_rules
from vit_jax.config_checks import ConfigError
from vit_jax.config_checks import require

PyTree = Any
METHODS = ('none', 'magnitude', 'n_m', 'heads')
END_FRACTION = 0.75  # end_step None: the cubic ramp ends at 3/4 of the run.
_ATTENTION_PARAM = re.compile(
    r'((?:.*/)?MultiHeadDotProductAttention_\d+)/(query|key|value|out)/(kernel|bias)')
_STACKED = re.compile(r'Transformer/encoderblock/.*')


class PruneState(NamedTuple):
  """count: updates so far (int32); masks: see the module docstring;
  pruned_fraction: zeros / size over the pruned params (float32), as of the
  last recompute."""
  count: jax.Array
  masks: PyTree
  pruned_fraction: jax.Array


class _Leaf(NamedTuple):
  """How one parameter is pruned."""
  stacked: bool        # Leading [num_layers] axis: pruned layer by layer.
  input_axes: int      # n_m: how many leading (per-layer) axes are the input.
  module: str = ''     # heads: its attention module,
  head_axis: int = 0   # and the heads axis of a layer's slice.


# --------------------------------------------------------------------------------
# Config.
# --------------------------------------------------------------------------------
def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad `config.pruning` key.

  What the rules select (and whether m divides each kernel's input, or
  whether the sparsity leaves a head per layer) needs the model:
  `check_rules_select`; whether the span fits the run: `schedule_span`.
  """
  p = config.get('pruning')
  if p is None:  # A config saved before pruning existed.
    return
  config_checks.one_of(p.method, METHODS, 'pruning.method')
  config_checks.number(p.sparsity, 'pruning.sparsity')
  require(0 <= p.sparsity < 1,
          f'config.pruning.sparsity must be in [0, 1), got {p.sparsity}')
  require(isinstance(p.rules, str) and p.rules,
          f'config.pruning.rules must be a non-empty regex, got {p.rules!r}')
  param_rules.compile_rule('pruning.rules', p.rules)
  config_checks.positive_int(p.n, 'pruning.n')
  config_checks.positive_int(p.m, 'pruning.m')
  require(p.n < p.m, f'config.pruning.n must be < config.pruning.m (keep n of '
          f'every m weights), got n={p.n}, m={p.m}')
  require(config_checks.is_int(p.begin_step) and p.begin_step >= 0,
          f'config.pruning.begin_step must be an integer >= 0, got {p.begin_step!r}')
  require(p.end_step is None or (config_checks.is_int(p.end_step)
                                 and p.end_step >= p.begin_step),
          'config.pruning.end_step must be None (3/4 of the run) or an integer '
          f'>= begin_step {p.begin_step}, got {p.end_step!r}')
  config_checks.positive_int(p.update_every, 'pruning.update_every')


def schedule_span(pruning: ml_collections.ConfigDict,
                  total_steps: int) -> tuple[int, int]:
  """(begin, end) steps of the schedule; end_step None is 3/4 of the run.

  Raises:
    ConfigError: the span does not fit in the run's `total_steps`.
  """
  begin = int(pruning.begin_step)
  end = (round(END_FRACTION * total_steps) if pruning.end_step is None
         else int(pruning.end_step))
  require(begin <= end, f'config.pruning.begin_step {begin} is after the end '
          f'of the schedule, step {end} (3/4 of total_steps {total_steps}); '
          'set config.pruning.end_step')
  require(end <= total_steps, f'config.pruning.end_step {end} exceeds '
          f'config.total_steps {total_steps} (the length of the run)')
  return begin, end


def target_sparsity(step: Any, final: float, begin: int, end: int) -> jax.Array:
  """Zhu & Gupta's cubic ramp from 0 at `begin` to `final` at `end` (float32)."""
  step = jnp.asarray(step, jnp.float32)
  frac = jnp.clip((step - begin) / max(end - begin, 1), 0.0, 1.0)
  frac = jnp.where(step >= end, 1.0, frac)
  return jnp.float32(final) * (1.0 - (1.0 - frac) ** 3)


def is_update_step(step: Any, begin: int, end: int, every: int) -> jax.Array:
  """Whether masks are recomputed at `step` (1-based, as the logs count)."""
  step = jnp.asarray(step, jnp.int32)
  due = ((step - begin) % every == 0) | (step == end) | (step == max(begin, 1))
  return (step >= begin) & (step <= end) & due


def prune_count(sparsity: Any, size: int) -> jax.Array:
  """round(sparsity * size) in float32 (half to even), as every mask counts."""
  return jnp.round(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)


# --------------------------------------------------------------------------------
# Which parameters are pruned, and how.
# --------------------------------------------------------------------------------
def _plan(params: PyTree, method: str, rules: str) -> dict[str, _Leaf]:
  """Parameter name -> how it is pruned, for every pruned parameter."""
  names = jax.tree.leaves(param_rules.tree_paths(params))
  shapes = dict(zip(names, (np.shape(x) for x in jax.tree.leaves(params))))
  selected = [n for n in names if re.fullmatch(rules, n)]
  plan = {}
  if method == 'heads':
    modules = {m.group(1) for m in map(_ATTENTION_PARAM.fullmatch, selected) if m}
    for name in names:
      match = _ATTENTION_PARAM.fullmatch(name)
      if not match or match.group(1) not in modules or match.group(2, 3) == (
          'out', 'bias'):  # The out bias is not per head.
        continue
      qkv_kernel = match.group(2) != 'out' and match.group(3) == 'kernel'
      plan[name] = _Leaf(bool(_STACKED.fullmatch(name)), 0, match.group(1),
                         1 if qkv_kernel else 0)
  elif method in ('magnitude', 'n_m'):
    for name in selected:
      stacked = bool(_STACKED.fullmatch(name))
      ndim = len(shapes[name]) - stacked
      match = _ATTENTION_PARAM.fullmatch(name)
      qkv_kernel = match and match.group(2) != 'out' and match.group(3) == 'kernel'
      plan[name] = _Leaf(stacked, 1 if qkv_kernel else ndim - 1)
  return plan


def pruned_names(params: PyTree, pruning: ml_collections.ConfigDict) -> list[str]:
  """Names of the parameters `pruning` masks (for 'heads': every query/key/
  value kernel and bias and out kernel of the modules its rule selects)."""
  if pruning.method == 'none':
    return []
  return list(_plan(params, pruning.method, pruning.rules))


def _per_layer(fn: Any, stacked: bool) -> Any:
  return jax.vmap(fn) if stacked else fn


def keep_largest(score: jax.Array, sparsity: Any) -> jax.Array:
  """False for the round(sparsity * size) smallest entries of `score` (ties:
  the lower flat index first), True elsewhere; the count is exact."""
  flat = score.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(
      jnp.arange(flat.size, dtype=jnp.int32))
  return (rank >= prune_count(sparsity, flat.size)).reshape(score.shape)


def keep_n_of_m(score: jax.Array, input_axes: int, n: int, m: int) -> jax.Array:
  """True for the `n` largest of every `m` consecutive entries along the
  (flattened) leading `input_axes` axes of `score`; ties: the lower index."""
  rows = math.prod(score.shape[:input_axes])
  groups = score.reshape(rows // m, m, -1)
  rank = jnp.argsort(jnp.argsort(-groups, axis=1, stable=True), axis=1)
  return (rank < n).reshape(score.shape)


def _head_energy(x: jax.Array, leaf: _Leaf) -> tuple[jax.Array, tuple[int, ...]]:
  """Sum of squares per head, [heads] ([num_layers, heads] if stacked), and
  the axes it summed (where a head mask broadcasts)."""
  keep = (0, leaf.head_axis + 1) if leaf.stacked else (leaf.head_axis,)
  axes = tuple(a for a in range(x.ndim) if a not in keep)
  return jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes), axes


def _masks(weights: dict[str, jax.Array], plan: dict[str, _Leaf],
           pruning: ml_collections.ConfigDict, sparsity: jax.Array
           ) -> dict[str, jax.Array]:
  """New masks of the pruned params from their would-be weights."""
  if pruning.method == 'n_m':
    return {name: _per_layer(lambda w, k=leaf.input_axes: keep_n_of_m(
        jnp.abs(w), k, pruning.n, pruning.m), leaf.stacked)(weights[name])
            for name, leaf in plan.items()}
  if pruning.method == 'magnitude':
    return {name: _per_layer(lambda w: keep_largest(jnp.abs(w), sparsity),
                             leaf.stacked)(weights[name])
            for name, leaf in plan.items()}
  masks = {}
  for module in sorted({leaf.module for leaf in plan.values()}):
    members = [n for n, leaf in plan.items() if leaf.module == module]
    energy = sum(_head_energy(weights[n], plan[n])[0] for n in members)
    keep = _per_layer(lambda e: keep_largest(jnp.sqrt(e), sparsity),
                      plan[members[0]].stacked)(energy)
    for name in members:
      axes = _head_energy(weights[name], plan[name])[1]
      masks[name] = jnp.broadcast_to(jnp.expand_dims(keep, axes),
                                     weights[name].shape)
  return masks


# --------------------------------------------------------------------------------
# The transformation.
# --------------------------------------------------------------------------------
def prune(pruning: ml_collections.ConfigDict,
          total_steps: int) -> optax.GradientTransformation:
  """The pruning transformation of `config.pruning` (checked by check_config).

  Its update needs the params: `tx.update(grads, state, params)`.
  """
  begin, end = schedule_span(pruning, total_steps)
  every, final = int(pruning.update_every), float(pruning.sparsity)

  def init(params):
    plan = _plan(params, pruning.method, pruning.rules)
    names = param_rules.tree_paths(params)
    masks = jax.tree.map(lambda name, p: jnp.ones(
        np.shape(p) if name in plan else (), jnp.bool_), names, params)
    return PruneState(jnp.zeros((), jnp.int32), masks, jnp.zeros((), jnp.float32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('pruning needs the params: tx.update(grads, state, params)')
    plan = _plan(params, pruning.method, pruning.rules)
    names = jax.tree.leaves(param_rules.tree_paths(params))
    p_leaves, treedef = jax.tree.flatten(params)
    u_leaves = treedef.flatten_up_to(updates)
    m_leaves = treedef.flatten_up_to(state.masks)
    step = state.count + 1

    def recompute():
      weights = {n: p + u for n, p, u in zip(names, p_leaves, u_leaves) if n in plan}
      new = _masks(weights, plan, pruning, target_sparsity(step, final, begin, end))
      zeros = sum(jnp.sum(~m).astype(jnp.float32) for m in new.values())
      size = sum(m.size for m in new.values())
      return ([new.get(n, m) for n, m in zip(names, m_leaves)],
              zeros / max(size, 1))

    masks, fraction = jax.lax.cond(
        is_update_step(step, begin, end, every), recompute,
        lambda: (list(m_leaves), state.pruned_fraction))
    updates = [jnp.where(m, u, -p) if n in plan else u
               for n, p, u, m in zip(names, p_leaves, u_leaves, masks)]
    return (treedef.unflatten(updates),
            PruneState(step, treedef.unflatten(masks), fraction))

  return optax.GradientTransformation(init, update)


def pruned_fraction(opt_state: PyTree) -> jax.Array | None:
  """The pruned fraction of an optimizer state with pruning, else None."""
  found = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, PruneState))
           if isinstance(s, PruneState)]
  return found[0].pruned_fraction if found else None


def check_rules_select(config: ml_collections.ConfigDict, params: PyTree) -> None:
  """Raises ConfigError if `config.pruning` cannot prune the model's params.

  `params` are the model's (abstract) params: the rule must select some;
  N:M needs `m` to divide every selected kernel's input dimension; heads
  must leave every attention module at least one head at the final sparsity.
  """
  p = config.get('pruning')
  if p is None or p.method == 'none':
    return
  plan = _plan(params, p.method, p.rules)
  names = jax.tree.leaves(param_rules.tree_paths(params))
  shapes = dict(zip(names, (tuple(np.shape(x)) for x in jax.tree.leaves(params))))
  if not plan:
    what = ("selects no attention module's query/key/value/out parameter"
            if p.method == 'heads' else 'matches no parameter')
    examples = [n for n in names if n.endswith('/kernel')][:3] or names[:3]
    raise ConfigError(f'config.pruning.rules {p.rules!r} {what}; parameter '
                      f'names look like {examples}')
  for name, leaf in plan.items():
    shape = shapes[name][leaf.stacked:]
    if p.method == 'n_m':
      require(len(shape) >= 2, f"config.pruning.method='n_m' prunes kernels "
              f'along their input axis; {name} has shape {shapes[name]}; '
              'narrow config.pruning.rules')
      size = math.prod(shape[:leaf.input_axes])
      require(size % p.m == 0, f'config.pruning.m={p.m} does not divide the '
              f'input dimension {size} of {name} (shape {shapes[name]}); pick '
              'an m that divides it or leave the parameter out of the rules')
    elif p.method == 'heads':
      heads = shape[leaf.head_axis]
      pruned = int(np.round(np.float32(p.sparsity) * np.float32(heads)))
      require(pruned < heads, f'config.pruning.sparsity={p.sparsity} prunes '
              f'round({p.sparsity} * {heads}) = {pruned} of the {heads} heads of '
              f'{leaf.module}: all of them; lower it so that a head is left')
