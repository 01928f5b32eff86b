"""What every entry point does first, before JAX starts its backends.

Three things, for train.py and every tool alike: library log records below a
level are dropped (orbax, jax and etils internals log at INFO on every save
and restore, which buries the progress lines), the XLA flags that speed up the
config's precision policy are added where this jaxlib knows them
(vit_jax/xla_flags.py), and the config's `cpu_devices` split of a CPU host is
applied. The flags and the split only take effect before anything touches a
device, which is why they happen here and nowhere else.
"""

import logging
from typing import Any

from absl import logging as absl_logging

from vit_jax import parallel
from vit_jax import xla_flags
from vit_jax.config_checks import ConfigError

_NOISY_PATHS = ('/orbax/', '/jax/_src/', '/etils/')


class QuietLibraries(logging.Filter):
  """Drops records below `level` that come from orbax/jax/etils internals."""

  def __init__(self, level: int):
    super().__init__()
    self.level = level

  def filter(self, record: logging.LogRecord) -> bool:
    return (record.levelno >= self.level or
            not any(p in record.pathname for p in _NOISY_PATHS))


_FILTERS: dict[int, QuietLibraries] = {}  # One per level: addFilter skips repeats.


def prepare_process(config: Any = None, *, quiet_below: int = logging.WARNING
                    ) -> None:
  """Quiets library logs below `quiet_below`, applies the config's XLA flags
  and `config.mesh.cpu_devices`.

  Call it before anything touches a device (train.py calls it before
  `jax.distributed.initialize`). Raises ConfigError (a ValueError) for a
  non-bool `xla_auto_flags`, an unknown `model.precision` or a negative
  `cpu_devices`.
  """
  quiet = _FILTERS.setdefault(quiet_below, QuietLibraries(quiet_below))
  # absl's handler sees jax's own Python loggers; the 'absl' logger carries
  # what orbax logs through absl.logging when no handler is installed yet.
  absl_logging.get_absl_handler().addFilter(quiet)
  logging.getLogger('absl').addFilter(quiet)
  if config is not None:
    _apply_xla_flags(config)
    parallel.use_cpu_devices(config.mesh.cpu_devices)


def _apply_xla_flags(config: Any) -> None:
  """The flags of `config.model.precision` (xla_flags.AUTO_FLAGS), unless
  `config.xla_auto_flags` is False."""
  xla_flags.check_config(config)
  # None: the variant's own, which is float32 for every registered variant.
  precision = config.model.get('precision') or 'float32'
  try:
    applied = xla_flags.apply(precision,
                              config.get(xla_flags.CONFIG_KEY, True))
  except ValueError as e:  # "precision 'x' is not a policy; ...".
    raise ConfigError(f'config.model.{e}') from None
  if applied:
    absl_logging.info('XLA flags for precision %s: %s', precision,
                      ' '.join(applied))
