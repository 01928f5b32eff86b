"""The input keys' checks, and the names they allow: no TensorFlow here.

`check_config` is the one check of `dataset`, the `input` keys that can be
wrong without the data, `eval.splits` and the `pp` section. It imports nothing
of TensorFlow, so every entry point can check a config (and a TF-free install,
such as a GPU machine running the benchmark, can too); the ops that honour the
settings (preprocess.py, augment.py, sources.py) take their names from here.
"""

from vit_jax.config_checks import ConfigError
from vit_jax.config_checks import positive_int
from vit_jax.config_checks import require
from vit_jax.data.pixel_limit import DEFAULT_MAX_IMAGE_PIXELS

TRAIN_CROPS = ('inception', 'random', 'resize', 'pad')
# How a TFDS dataset is read (config.input.tfds_reader); see sources.py.
TFDS_READERS = ('shards', 'as_dataset')
# RandAugment's magnitude -> op argument rules (augment_rules.py); the
# recipes' published numbers were trained with the reference rule.
RANDAUGMENT_RULES = ('reference', 'increasing')
DEFAULT_RANDAUGMENT_RULE = 'reference'
MAX_MAGNITUDE = 30.0  # RandAugment's scale: 10 = each op's reference maximum.


def eval_splits(config) -> list[str]:
  """`config.eval.splits` ('test' or 'validation, test') as a list."""
  return [s.strip() for s in config.eval.splits.split(',') if s.strip()]


def check_config(config) -> None:
  """Raises ConfigError naming the first bad input setting, without any IO.

  `dataset` (a name), the `input` keys that can be wrong without the data
  (`channels`, `image_size`, `max_image_pixels`, `tfds_reader`),
  `eval.splits` and the `pp` section. What needs the data itself (the dataset exists, its splits do) is
  checked by `get_dataset_info`.
  """
  require(isinstance(config.dataset, str) and config.dataset.strip() != '',
          "config.dataset must be a dataset name (e.g. 'digits') or "
          f"'folder:/path', got {config.dataset!r}")
  require(config.input.channels in (1, 3), 'config.input.channels must be 1 '
          f'(grayscale) or 3 (RGB), got {config.input.channels!r}')
  positive_int(config.input.image_size, 'input.image_size')
  # .get: configs saved before the key existed read images up to the default.
  positive_int(config.input.get('max_image_pixels', DEFAULT_MAX_IMAGE_PIXELS),
               'input.max_image_pixels')
  require(bool(eval_splits(config)), 'config.eval.splits is empty')
  require(config.input.tfds_reader in TFDS_READERS,
          f'config.input.tfds_reader={config.input.tfds_reader!r}; expected '
          f'one of {TFDS_READERS}.')
  check_pp(config.pp)


def augment_settings(pp) -> tuple[int, float, float]:
  """(randaugment_layers, randaugment_magnitude, random_erase_prob).

  Defaults (off) when absent, so `pp` sections saved before these keys
  existed, or written only for eval, still work.
  """
  return (pp.get('randaugment_layers', 0), pp.get('randaugment_magnitude', 10.0),
          pp.get('random_erase_prob', 0.0))


def randaugment_rule(pp) -> str:
  """`pp.randaugment_rule`, or the reference rule if absent (older configs)."""
  return pp.get('randaugment_rule', DEFAULT_RANDAUGMENT_RULE)


def check_pp(pp) -> None:
  """Raises ConfigError for `config.pp` settings the ops cannot honour.

  The one check of the section; preprocess.train_preprocess and
  eval_preprocess take a `pp` that passed it.
  """
  if pp.train_crop not in TRAIN_CROPS:
    raise ConfigError(f'config.pp.train_crop={pp.train_crop!r}; expected one '
                      f'of {TRAIN_CROPS}.')
  if not 0.0 < pp.area_min <= 1.0:
    raise ConfigError(f'config.pp.area_min={pp.area_min} must be in (0, 1].')
  padding = pp.get('crop_padding', 4)
  if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
    raise ConfigError(f'config.pp.crop_padding={padding!r} must be an integer '
                      ">= 0 (pixels of border for train_crop='pad').")
  if not 0.0 < pp.eval_crop_fraction <= 1.0:
    raise ConfigError(f'config.pp.eval_crop_fraction={pp.eval_crop_fraction} '
                      'must be in (0, 1].')
  layers, magnitude, erase_prob = augment_settings(pp)
  if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
    raise ConfigError(f'config.pp.randaugment_layers={layers!r} must be an '
                      'integer >= 0 (0 disables RandAugment).')
  if (isinstance(magnitude, bool) or not isinstance(magnitude, (int, float))
      or not 0 <= magnitude <= MAX_MAGNITUDE):
    raise ConfigError(f'config.pp.randaugment_magnitude={magnitude!r} must be '
                      f'a number in [0, {MAX_MAGNITUDE:g}] (10 = each '
                      "op's reference maximum).")
  if (isinstance(erase_prob, bool) or
      not isinstance(erase_prob, (int, float)) or not 0 <= erase_prob <= 1):
    raise ConfigError(f'config.pp.random_erase_prob={erase_prob!r} must be a '
                      'probability in [0, 1].')
  rule = randaugment_rule(pp)
  if rule not in RANDAUGMENT_RULES:
    raise ConfigError(f'config.pp.randaugment_rule={rule!r}; expected one of '
                      f'{RANDAUGMENT_RULES} (how RandAugment magnitudes become op '
                      'arguments, see vit_jax/data/augment_rules.py).')
