"""Per-parameter rules as data: regexes over '/'-joined parameter paths.

Parameters are named by their path in the params tree (`head/kernel`,
`Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`), the names the released
checkpoints use. Every per-parameter behaviour is written against these names,
big_vision style, instead of being a special case in the optimizer:

  regex_mask(params, pattern)         one pattern -> bools (weight decay, frozen)
  match_rules(params, rules, default) ordered (pattern, value) pairs, first match
                                      wins (lr multipliers)
  layer_ids(params)                   depth per parameter (layer-wise lr decay)

Config keys (configs/common.py): `wd_mask`, `frozen`, `lr_mults`, `layer_decay`;
vit_jax.optim.make_optimizer turns them into optax transformations.
`check_rule_syntax` refuses a malformed rule at start-up, `check_rules_select`
one that selects nothing once the model's params are known; both before
anything is compiled.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax

from vit_jax.config_checks import ConfigError
from vit_jax.config_checks import is_number
from vit_jax.config_checks import require
from vit_jax.metrics import summarize_names

PyTree = Any


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def tree_paths(tree: PyTree) -> PyTree:
  """Returns a tree like `tree` whose leaves are their '/'-joined paths.

  Rules (weight decay, freezing, lr multipliers, layer depth) are written against
  these names, so they read like the keys of a released .npz checkpoint.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: '/'.join(_key_name(k) for k in path), tree)


def regex_mask(params: PyTree, pattern: str) -> PyTree:
  """Returns a tree of bools: True where the parameter's path matches `pattern`.

  Matching uses `re.fullmatch`: the pattern must describe the whole path, so a rule
  `head/.*` never catches `prehead/kernel` by accident, and `kernel` alone matches
  only a top-level `kernel` (write `.*/kernel` for every kernel). An empty pattern
  matches nothing.
  """
  if not pattern:
    return jax.tree_util.tree_map(lambda _: False, params)
  regex = re.compile(pattern)
  return jax.tree_util.tree_map(
      lambda name: regex.fullmatch(name) is not None, tree_paths(params))


def match_rules(params: PyTree, rules: Sequence[tuple[str, Any]],
                default: Any) -> PyTree:
  """Per leaf, the value of the first rule whose pattern fully matches its path.

  `rules` are ordered data, e.g. `(('head/.*', 10.0), ('.*/bias', 0.0))`; a leaf
  no rule matches gets `default`. First match wins, so specific rules go first.
  """
  compiled = [(re.compile(pattern), value) for pattern, value in rules]

  def value_of(name: str) -> Any:
    return next((v for regex, v in compiled if regex.fullmatch(name)), default)

  return jax.tree_util.tree_map(value_of, tree_paths(params))


# Numbered layers: ViT encoder blocks and Mixer blocks. The modules after the last
# block (final norm, MAP head, pre_logits, head) sit on top of them.
_BLOCK_PATH = re.compile(r'(?:Transformer/encoderblock_|MixerBlock_)(\d+)/.*')
_TOP_PATH = re.compile(r'(?:head|pre_logits|MAPHead_0|pre_head_layer_norm|'
                       r'Transformer/encoder_norm)/.*')


def layer_ids(params: PyTree) -> tuple[PyTree, int]:
  """Depth of each parameter for layer-wise lr decay, and the top depth.

  As in BEiT: embedding, cls, posemb (and a hybrid's ResNet stem) are depth 0,
  block i is depth i + 1, and everything after the last block is the top depth
  num_blocks + 1. Depths come from the names, so no config has to repeat them.
  """
  paths = tree_paths(params)
  blocks = [int(m.group(1)) for m in map(
      _BLOCK_PATH.fullmatch, jax.tree_util.tree_leaves(paths)) if m]
  top = max(blocks, default=-1) + 2

  def depth(name: str) -> int:
    block = _BLOCK_PATH.fullmatch(name)
    if block:
      return int(block.group(1)) + 1
    return top if _TOP_PATH.fullmatch(name) else 0

  return jax.tree_util.tree_map(depth, paths), top


def lr_multipliers(params: PyTree, lr_mults: Sequence[tuple[str, float]] = (),
                   layer_decay: float = 1.0) -> PyTree:
  """Per-parameter factor on the learning rate (python floats, one per leaf).

  The factor is the first matching `lr_mults` rule's value (1 if none) times
  `layer_decay ** (top - depth)` (see `layer_ids`): the head keeps the full lr,
  the last block gets layer_decay, the embedding layer_decay ** (num_blocks + 1).
  """
  mults = match_rules(params, lr_mults, 1.0)
  if layer_decay != 1.0:
    depths, top = layer_ids(params)
    mults = jax.tree_util.tree_map(
        lambda m, d: m * layer_decay ** (top - d), mults, depths)
  return mults


def scale_by_lr_multipliers(lr_mults: Sequence[tuple[str, float]] = (),
                            layer_decay: float = 1.0
                            ) -> optax.GradientTransformation:
  """Multiplies each update by its `lr_multipliers` factor; stateless.

  The factors are constants worked out from the update tree's paths when the
  step is traced, so building the transformation needs no params.
  """
  rules = tuple((str(p), float(m)) for p, m in lr_mults)

  def update(updates, state, params=None):
    del params
    mults = lr_multipliers(updates, rules, float(layer_decay))
    return jax.tree_util.tree_map(
        lambda u, m: u if m == 1.0 else u * m, updates, mults), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def compile_rule(key: str, pattern: Any) -> re.Pattern:
  """`pattern` compiled, or a ConfigError naming `config.<key>`: the one
  syntax check of every regex rule (optimizer, pruning, quantization)."""
  require(isinstance(pattern, str),
          f'config.{key} must be a regex string, got {pattern!r}.')
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ConfigError(f'config.{key} {pattern!r} is not a regex: {e}.') from None


def check_rule_syntax(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming a parameter rule that is malformed.

  Regexes must compile, multipliers be numbers >= 0, 0 < layer_decay <= 1.
  Which parameters the rules select needs the model: `check_rules_select`.
  """
  for key in ('wd_mask', 'frozen'):
    compile_rule(f'optim.{key}', config.optim[key])
  for i, rule in enumerate(config.optim.lr_mults):
    require(isinstance(rule, (tuple, list)) and len(rule) == 2
            and is_number(rule[1]) and 0 <= rule[1] < math.inf,
            f'config.optim.lr_mults[{i}] must be a (regex, multiplier >= 0) pair, '
            f'got {rule!r}.')
    compile_rule(f'optim.lr_mults[{i}]', rule[0])
  decay = config.optim.layer_decay
  require(is_number(decay) and 0 < decay <= 1,
          f'config.optim.layer_decay must be in (0, 1] (1 disables), got {decay!r}.')


def check_rules_select(config: ml_collections.ConfigDict, params: PyTree) -> None:
  """Raises ConfigError for a rule that selects nothing in the model's params.

  `params` are the model's (abstract) params; the rules passed
  `check_rule_syntax`. A typo in a regex would otherwise train the whole run
  without the rule.
  """
  names = jax.tree_util.tree_leaves(tree_paths(params))
  hint = f'parameter names look like {names[:3]}'
  selects = lambda pattern: any(re.fullmatch(pattern, n) for n in names)
  opt = config.optim
  if opt.weight_decay > 0 and not selects(opt.wd_mask):
    raise ConfigError(f'config.optim.wd_mask {opt.wd_mask!r} matches no '
                      f'parameter; {hint}.')
  if opt.frozen:
    frozen = [n for n in names if re.fullmatch(opt.frozen, n)]
    if not frozen:
      raise ConfigError(f'config.optim.frozen {opt.frozen!r} matches no '
                        f'parameter; {hint}.')
    if len(frozen) == len(names):
      raise ConfigError(f'config.optim.frozen {opt.frozen!r} matches every '
                        'parameter: nothing would train.')
  winners = jax.tree_util.tree_leaves(match_rules(
      params, [(p, i) for i, (p, _) in enumerate(opt.lr_mults)], -1))
  for i, (pattern, _) in enumerate(opt.lr_mults):
    if i not in winners:
      why = ('every parameter it matches is taken by an earlier rule'
             if selects(pattern) else f'it matches no parameter; {hint}')
      raise ConfigError(f'config.optim.lr_mults[{i}] {pattern!r} applies to no '
                        f'parameter: {why}.')
  if opt.layer_decay != 1 and layer_ids(params)[1] == 1:
    raise ConfigError('config.optim.layer_decay needs numbered blocks '
                      '(Transformer/encoderblock_i or MixerBlock_i); the model has none.')


def describe_param_rules(config: ml_collections.ConfigDict, params: PyTree) -> str:
  """One line: which parameters are frozen and which lr factor the others get."""
  names = jax.tree_util.tree_leaves(tree_paths(params))
  frozen = jax.tree_util.tree_leaves(regex_mask(params, config.optim.frozen))
  mults = jax.tree_util.tree_leaves(lr_multipliers(
      params, config.optim.lr_mults, float(config.optim.layer_decay)))
  groups: dict[float, list[str]] = {}
  for name, is_frozen, mult in zip(names, frozen, mults):
    groups.setdefault(0.0 if is_frozen else mult, []).append(name)
  parts = [f'{"frozen" if m == 0 else f"lr x{m:.4g}"}: {summarize_names(g)}'
           for m, g in sorted(groups.items())]
  return 'Parameter rules: ' + '; '.join(parts)
