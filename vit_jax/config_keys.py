"""The config's key layout: keys that moved, and configs saved before they did.

Training configs group their keys by the code that reads them (configs/common.py,
docs/configs.md). The flat layout before that is refused with the new name
wherever it appears (a config file, a `--config.` flag), and translated where
it was saved (a workdir's checkpoints), so old runs keep resuming and keep
working in the tools.
"""

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from vit_jax.config_checks import ConfigError

# Old dotted key -> new dotted key.
RENAMED = {
    'pretrained_keep_pre_logits': 'pretrained.keep_pre_logits',
    'pretrained_posemb_resize': 'pretrained.posemb_resize',
    'pretrained_patch_resize': 'pretrained.patch_resize',  # The spelling.
    'data_dir': 'input.data_dir',
    'train_split': 'input.train_split',
    'image_size': 'input.image_size',
    'channels': 'input.channels',
    'shuffle_buffer': 'input.shuffle_buffer',
    'cache': 'input.cache',
    'prefetch': 'input.prefetch',
    'skip_bad_images': 'input.skip_bad_images',
    'tfds_reader': 'input.tfds_reader',
    'eval_splits': 'eval.splits',
    'eval_batch_size': 'eval.batch_size',
    'grad_clip_norm': 'optim.grad_clip_norm',
    'weight_decay': 'optim.weight_decay',
    'wd_mask': 'optim.wd_mask',
    'frozen': 'optim.frozen',
    'lr_mults': 'optim.lr_mults',
    'layer_decay': 'optim.layer_decay',
    'lr.base': 'schedule.base_lr',
    'lr.schedule': 'schedule.name',
    'lr.warmup_steps': 'schedule.warmup_steps',
    'lr.end_value': 'schedule.end_lr',
    'lr.timescale': 'schedule.timescale',
    'accum_steps': 'train.accum_steps',
    'label_smoothing': 'train.label_smoothing',
    'ema_decay': 'train.ema_decay',
    'nan_policy': 'train.nan_policy',
    'parallelism': 'train.parallelism',
    'cpu_devices': 'mesh.cpu_devices',
    'sharding': 'sharding.rules',
    'fsdp_min_size': 'sharding.fsdp_min_size',
    'keep_checkpoints': 'checkpoint.keep',
    'peak_flops': 'metrics.peak_flops',
    'write_plot': 'metrics.write_plot',
    # Saved 'float32' and 'bfloat16' mean the same as the policies of that name.
    'model.dtype': 'model.precision',
}
# Why a key moved, where it is not the regrouping.
_WHY = {'model.dtype': 'a precision policy replaces the dtype: float32, '
                       'mixed_bf16 (bf16 products, float32 elsewhere) or '
                       'bfloat16 (all activations bf16)'}
# Whole sections that moved.
_RENAMED_SECTIONS = {'lr': 'schedule'}
_CONFIG_FLAG = re.compile(r'^--?config\.([A-Za-z0-9_.]+)')


def new_name(old: str) -> str | None:
  """The current name of an old dotted key ('lr.base' -> 'schedule.base_lr')."""
  if old in RENAMED:
    return RENAMED[old]
  section, _, rest = old.partition('.')
  if section in _RENAMED_SECTIONS:
    return _RENAMED_SECTIONS[section] + ('.' + rest if rest else '')
  return None


def _moved_message(old: str, where: str) -> str:
  new = new_name(old)
  why = _WHY.get(old, 'keys are grouped by the code that reads them; '
                  'docs/configs.md lists them')
  return f'{where} config.{old} is now config.{new} ({why})'


def check_flags(argv: Sequence[str]) -> None:
  """Raises ConfigError for a `--config.<old key>=...` flag, naming the new key.

  Runs before the flags are parsed: ml_collections would only say that the
  old key does not exist.
  """
  for arg in argv:
    match = _CONFIG_FLAG.match(arg)
    if not match:
      continue
    key = match.group(1)
    # The longest prefix that moved: --config.lr.base, --config.weight_decay.
    parts = key.split('.')
    for n in range(len(parts), 0, -1):
      old = '.'.join(parts[:n])
      # 'sharding' moved as a key but is a section now: only its bare form.
      if new_name(old) is not None and not (old == 'sharding' and n < len(parts)):
        raise ConfigError(_moved_message(old, f'{arg.split("=")[0]}:'))


def check_config(config: Mapping[str, Any]) -> None:
  """Raises ConfigError if `config` (a training config) has an old key.

  A config file written for the old layout that assigns top-level keys to an
  unlocked ConfigDict (`config.weight_decay = 0.05`) creates them silently;
  this names each one's new place.
  """
  for key, value in config.items():
    is_section = isinstance(value, (Mapping, ml_collections.ConfigDict))
    if new_name(key) is not None and not (key == 'sharding' and is_section):
      raise ConfigError(_moved_message(key, 'the config sets'))


def upgrade(saved: Mapping[str, Any]) -> dict[str, Any]:
  """A saved config dict (a checkpoint's JSON) in the current layout.

  Old keys move to their new place; a config saved in the current layout is
  returned as it is (a copy). Keys neither layout knows are kept.
  """
  tree = copy.deepcopy(dict(saved))
  moves = {}
  for old in RENAMED:
    found, value = _pop(tree, old)
    if found:
      moves[RENAMED[old]] = value
  for section, new in _RENAMED_SECTIONS.items():
    if isinstance(tree.get(section), Mapping):
      leftovers = tree.pop(section)  # Section keys RENAMED did not list.
      for key, value in leftovers.items():
        moves[f'{new}.{key}'] = value
  for new, value in moves.items():
    _put(tree, new, value)
  return tree


def lookup(config: Mapping[str, Any], dotted: str) -> Any:
  """`config['input']['image_size']` for 'input.image_size'."""
  for part in dotted.split('.'):
    config = config[part]
  return config


def upgrade_flat(saved: Mapping[str, Any]) -> dict[str, Any]:
  """Flat dotted keys (a checkpoint's resume identity) in the current names."""
  return {new_name(k) or k: v for k, v in saved.items()}


def _pop(tree: dict[str, Any], dotted: str) -> tuple[bool, Any]:
  *parents, leaf = dotted.split('.')
  node = tree
  for part in parents:
    node = node.get(part)
    if not isinstance(node, dict):
      return False, None
  if leaf not in node or (dotted == 'sharding' and isinstance(node[leaf], dict)):
    return False, None
  return True, node.pop(leaf)


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split('.')
  node = tree
  for part in parents:
    node = node.setdefault(part, {})
  node[leaf] = value
