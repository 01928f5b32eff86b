"""The run's directory: made and proven writable before anything is written."""

import os
import uuid

from etils import epath

from vit_jax.config_checks import ConfigError


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` if its parent exists; raises if it cannot be written.

  Writability is tested by writing a file, not with os.access: that also holds
  for root (whom access() always allows), read-only mounts and object stores.
  """
  if not workdir:
    raise ConfigError('--workdir is required')
  path = epath.Path(workdir)
  if not path.exists():
    if not path.parent.exists():
      raise ConfigError(f'workdir {workdir}: parent directory {path.parent} does '
                        'not exist (create it, or pick another --workdir)')
    try:
      path.mkdir(exist_ok=True)  # Processes of one run may race to create it.
    except OSError as e:
      raise ConfigError(f'workdir {workdir} cannot be created ({e}); pick a '
                        'writable --workdir') from None
  if not path.is_dir():
    raise ConfigError(f'workdir {workdir} exists and is not a directory')
  probe = path / f'.write_probe_{uuid.uuid4().hex}'
  try:
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise ConfigError(f'workdir {workdir} is not writable ({e}); pick a '
                      'writable --workdir or fix its permissions') from None
  return os.fspath(path)
