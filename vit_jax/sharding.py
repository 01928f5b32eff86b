"""Sharding rules as data: which mesh axes each parameter is split over.

The mesh has two axes (vit_jax.parallel.make_mesh): `data` (batches are split
over it; FSDP splits parameters over it too) and `model` (tensor parallelism).
`config.sharding.rules` is an ordered tuple of `(regex, strategy)` rules over the
'/'-joined parameter paths of vit_jax.param_rules (first full match wins;
unmatched parameters are replicated), or one preset name that applies a
strategy to every parameter (`'fsdp'` == `(('.*', 'fsdp'),)`). Strategies:

  replicate   every device holds the whole array (plain data parallelism).
  fsdp        the largest dimension divisible by the `data` axis size is split
              over `data`; arrays under `config.sharding.fsdp_min_size` elements stay
              replicated (their all-gathers cost more than they save).
  model       Megatron-style tensor parallelism over `model`: attention
              query/key/value kernels and biases on the heads axis, the `out`
              kernel on its input heads axis, MLP `Dense_0` kernel and bias on
              the hidden (mlp_dim) axis, `Dense_1` kernel on its input axis;
              GFNet filters on their channel axis, AFNO weights on their
              channel-block axis.
              Other parameters matched by a 'model' rule stay replicated.
  fsdp+model  both: the model axis first, then FSDP on a remaining dimension.

Axes are counted from the end of each shape, so stacked parameters (a leading
layer axis from nn.scan) are split on the same axes. Optimizer state leaves
(Adam mu/nu, SGD momentum) and any other state leaf stored under a parameter's
path with its shape (e.g. an EMA copy) follow that parameter; everything else
(step counters, scalars, rng) is replicated.

Before anything compiles, `check_config` refuses a malformed rule, an unknown
strategy and 'shard_map' with anything but replicated parameters on a
data-only mesh; `check_rules_select` (given the model's params and the mesh) a
rule that selects nothing and a `model` axis that does not divide the heads or
mlp_dim of a parameter it splits.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vit_jax import param_rules
from vit_jax.config_checks import ConfigError
from vit_jax.config_checks import is_int
from vit_jax.config_checks import require
from vit_jax.metrics import summarize_names
from vit_jax.parallel import DATA_AXIS
from vit_jax.parallel import MODEL_AXIS

STRATEGIES = ('replicate', 'fsdp', 'model')
PRESETS = ('replicate', 'fsdp', 'model', 'fsdp+model')
DEFAULT_FSDP_MIN_SIZE = 2**18

Rules = tuple[tuple[str, frozenset[str]], ...]

# Tensor-parallel parameters: path regex -> (axis counted from the end, what
# that axis is, for error messages). Attention kernels are [hidden, heads,
# head_dim] (out: [heads, head_dim, hidden]); MLP kernels [in, out].
_ATTENTION = r'(?:.*/)?MultiHeadDotProductAttention_\d+'
_MLP = r'(?:.*/)?(?:MlpBlock_\d+|token_mixing|channel_mixing)'
_MODEL_AXES = tuple((re.compile(pattern), axis, what) for pattern, axis, what in (
    (_ATTENTION + r'/(?:query|key|value)/(?:kernel|bias)', -2, 'num_heads'),
    (_ATTENTION + r'/out/kernel', -3, 'num_heads'),
    (_MLP + r'/Dense_0/(?:kernel|bias)', -1, 'mlp_dim'),
    (_MLP + r'/Dense_1/kernel', -2, 'mlp_dim'),
    # Fourier mixers act per channel (global filter) or per channel block
    # (AFNO), so those axes split with no communication inside the mixer.
    (r'(?:.*/)?GlobalFilter_\d+/complex_weight', -2, 'hidden_size'),
    (r'(?:.*/)?AFNO2D_\d+/(?:w1|w2)', -3, 'afno_num_blocks'),
    (r'(?:.*/)?AFNO2D_\d+/(?:b1|b2)', -2, 'afno_num_blocks'),
))


def parse_rules(sharding: Any) -> Rules:
  """`config.sharding.rules` -> ((regex, {strategy, ...}), ...); raises ConfigError."""
  if isinstance(sharding, str):
    if sharding not in PRESETS:
      raise ConfigError(f'config.sharding.rules {sharding!r} is not a preset '
                        f"{PRESETS}; write rules as (('regex', 'strategy'), ...)")
    sharding = (('.*', sharding),)
  if not isinstance(sharding, (tuple, list)):
    raise ConfigError('config.sharding.rules must be a preset name or a tuple of '
                      f'(regex, strategy) rules, got {sharding!r}')
  rules = []
  for i, rule in enumerate(sharding):
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2
        or not all(isinstance(r, str) for r in rule)):
      raise ConfigError(f'config.sharding.rules[{i}] must be a (regex, strategy) pair '
                        f'of strings, got {rule!r}')
    pattern, strategy = rule
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f'config.sharding.rules[{i}] {pattern!r} is not a '
                        f'regex: {e}') from None
    parts = frozenset(strategy.split('+'))
    if not parts <= set(STRATEGIES) or ('replicate' in parts and len(parts) > 1):
      raise ConfigError(
          f'config.sharding.rules[{i}] strategy {strategy!r} is unknown: use one of '
          f'{STRATEGIES} or a combination such as fsdp+model')
    rules.append((pattern, parts - {'replicate'}))
  return tuple(rules)


def _model_axis(name: str, ndim: int) -> tuple[int, str] | None:
  """(axis, 'num_heads' | 'mlp_dim') split by 'model', or None."""
  for regex, axis, what in _MODEL_AXES:
    if regex.fullmatch(name) and ndim >= -axis:
      return ndim + axis, what
  return None


def param_spec(name: str, shape: Sequence[int], strategies: frozenset[str], *,
               data_size: int, model_size: int,
               fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
  """The PartitionSpec of one parameter under its rule's strategies."""
  spec = [None] * len(shape)
  if 'model' in strategies and model_size > 1:
    found = _model_axis(name, len(shape))
    if found is not None:
      spec[found[0]] = MODEL_AXIS
  if ('fsdp' in strategies and data_size > 1
      and int(np.prod(shape, dtype=np.int64)) >= fsdp_min_size):
    free = [i for i, n in enumerate(shape)
            if spec[i] is None and n % data_size == 0]
    if free:
      spec[max(free, key=lambda i: shape[i])] = DATA_AXIS
  return P(*spec)


def _winners(params: Any, rules: Rules) -> dict[str, int]:
  """Parameter name -> index of the rule that decides it (-1: none)."""
  indexed = param_rules.match_rules(
      params, [(p, i) for i, (p, _) in enumerate(rules)], -1)
  return dict(zip(jax.tree.leaves(param_rules.tree_paths(params)),
                  jax.tree.leaves(indexed)))


def param_specs(params: Any, rules: Rules, mesh: Mesh,
                fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE
                ) -> dict[str, tuple[tuple[int, ...], P]]:
  """'/'-joined parameter name -> (shape, PartitionSpec) under `rules`."""
  winners = _winners(params, rules)
  sizes = dict(mesh.shape)
  shapes = dict(zip(jax.tree.leaves(param_rules.tree_paths(params)),
                    (tuple(x.shape) for x in jax.tree.leaves(params))))
  return {name: (shape, param_spec(
      name, shape, rules[winners[name]][1] if winners[name] >= 0 else frozenset(),
      data_size=sizes.get(DATA_AXIS, 1), model_size=sizes.get(MODEL_AXIS, 1),
      fsdp_min_size=fsdp_min_size)) for name, shape in shapes.items()}


def _param_name(path: Sequence[Any]) -> str:
  """The trailing dict keys of a state leaf's path: its parameter's name.

  `.params['head']['kernel']` and `.opt_state[1][0].mu['head']['kernel']` both
  give 'head/kernel' (params are nested dicts; optimizer states are tuples and
  named tuples around them).
  """
  keys = []
  for key in reversed(path):
    if not isinstance(key, jax.tree_util.DictKey):
      break
    keys.append(str(key.key))
  return '/'.join(reversed(keys))


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Any = 'replicate',
                    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
  """NamedSharding for every leaf of a train state (anything with `.params`).

  A leaf stored under a parameter's name with that parameter's shape (the
  parameter itself, its Adam moments or momentum, an EMA copy) gets the
  parameter's sharding; every other leaf is replicated.
  """
  specs = param_specs(abstract_state.params, parse_rules(rules), mesh, fsdp_min_size)

  def sharding(path, leaf):
    shape_spec = specs.get(_param_name(path))
    if shape_spec is not None and shape_spec[0] == tuple(np.shape(leaf)):
      return NamedSharding(mesh, shape_spec[1])
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(sharding, abstract_state)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming a sharding setting that cannot work.

  Checks what the config alone decides: rule syntax, `fsdp_min_size`, and
  that 'shard_map' gets replicated parameters on a data-only mesh. What the
  rules select is checked against the model by `check_rules_select`.
  """
  rules = parse_rules(config.sharding.rules)
  min_size = config.sharding.fsdp_min_size
  require(is_int(min_size) and min_size >= 0,
          f'config.sharding.fsdp_min_size must be an integer >= 0, got {min_size!r}')
  require(config.train.parallelism != 'shard_map' or (
      not any(parts for _, parts in rules) and config.mesh.model == 1),
          "parallelism='shard_map' runs the step on replicated parameters over "
          "the data axis only: use config.sharding.rules='replicate' and "
          "config.mesh.model=1, or parallelism='jit' for fsdp/model sharding")


def check_rules_select(config: ml_collections.ConfigDict, params: Any,
                       mesh: Mesh) -> None:
  """Raises ConfigError unless every rule decides some parameter of `params`
  and the mesh's `model` axis divides what it splits."""
  rules = parse_rules(config.sharding.rules)
  names = jax.tree.leaves(param_rules.tree_paths(params))
  winners = _winners(params, rules)
  for i, (pattern, parts) in enumerate(rules):
    mine = [n for n in names if winners[n] == i]
    if not mine:
      why = ('every parameter it matches is taken by an earlier rule'
             if any(re.fullmatch(pattern, n) for n in names) else
             f'it matches no parameter; names look like {names[:3]}')
      raise ConfigError(f'config.sharding.rules[{i}] {pattern!r} applies to no '
                        f'parameter: {why}')
    if 'model' in parts and not any(_model_axis(n, 3) for n in mine):
      raise ConfigError(
          f'config.sharding.rules[{i}] {pattern!r} asks for model (tensor) parallelism '
          'but selects no attention query/key/value/out or MLP Dense_0/Dense_1 '
          f'parameter (it selects {summarize_names(mine)})')
  model_size = dict(mesh.shape).get(MODEL_AXIS, 1)
  shapes = dict(zip(names, (tuple(x.shape) for x in jax.tree.leaves(params))))
  for name, index in winners.items():
    found = (_model_axis(name, len(shapes[name]))
             if index >= 0 and 'model' in rules[index][1] else None)
    if found and shapes[name][found[0]] % model_size:
      axis, what = found
      raise ConfigError(
          f'config.mesh.model={model_size} does not divide {what}='
          f'{shapes[name][axis]} of {name} (shape {shapes[name]}); pick a model '
          f'axis size that divides the model\'s {what}')


def describe(state_sharding: Any, params: Any) -> str:
  """One line: which parameters are split over which axes (for the log)."""
  groups: dict[str, list[str]] = {}
  names = jax.tree.leaves(param_rules.tree_paths(params))
  for name, s in zip(names, jax.tree.leaves(state_sharding.params)):
    groups.setdefault(str(tuple(s.spec)) if any(s.spec) else 'replicated',
                      []).append(name)
  return 'Sharding: ' + '; '.join(f'{spec}: {summarize_names(g)}'
                                  for spec, g in sorted(groups.items()))


def from_config(config: ml_collections.ConfigDict, abstract_state: Any,
                mesh: Mesh) -> Any:
  """Checks `config.sharding.rules` against the model; the state's shardings."""
  check_rules_select(config, abstract_state.params, mesh)
  return state_shardings(abstract_state, mesh, config.sharding.rules,
                         config.sharding.fsdp_min_size)
