"""What every entry point does first, before JAX starts its backends.

Two things, for train.py and every tool alike: library log records below a
level are dropped (orbax, jax and etils internals log at INFO on every save
and restore, which buries the progress lines), and the config's
`cpu_devices` split of a CPU host is applied. The split only takes effect
before anything touches a device, which is why it happens here and nowhere
else.
"""

import logging
from typing import Any

from absl import logging as absl_logging

from vit_jax import parallel

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
  """Quiets library logs below `quiet_below` and applies `config.mesh.cpu_devices`.

  Call it before anything touches a device (train.py calls it before
  `jax.distributed.initialize`). Raises ValueError for a negative
  `cpu_devices`.
  """
  quiet = _FILTERS.setdefault(quiet_below, QuietLibraries(quiet_below))
  # absl's handler sees jax's own Python loggers; the 'absl' logger carries
  # what orbax logs through absl.logging when no handler is installed yet.
  absl_logging.get_absl_handler().addFilter(quiet)
  logging.getLogger('absl').addFilter(quiet)
  if config is not None:
    parallel.use_cpu_devices(config.mesh.cpu_devices)
