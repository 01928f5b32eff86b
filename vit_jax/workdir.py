"""The run's directory: made and proven writable before anything is written,
and removed again if a refused start left it empty."""

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator

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


@contextlib.contextmanager
def removed_if_unused(workdir: str | None) -> Iterator[None]:
  """Removes `workdir` if the block fails, it did not exist before, and no
  file was written into it (empty subdirectories, such as the checkpoint
  manager's, do not count). An existing workdir is never touched."""
  existed = not workdir or os.path.exists(workdir)
  try:
    yield
  except BaseException:
    if not existed and os.path.isdir(workdir) and not _holds_files(workdir):
      shutil.rmtree(workdir, ignore_errors=True)  # Other processes race it.
    raise


def _holds_files(directory: str) -> bool:
  return any(files for _, _, files in os.walk(directory))
