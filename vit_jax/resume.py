"""Which checkpoint a run resumes from: the newest one that restores intact.

A checkpoint can be damaged after Orbax committed it (a disk or copy truncates a
file, a byte flips). `checkpoint.restore` detects that (Orbax raises, or the
digest in `meta` differs); here the run then falls back to the next older
checkpoint. The damaged ones newer than it are moved out of the manager's view
to `<workdir>/corrupt_checkpoints/<step>-<time>/`, never deleted: the manager
would otherwise keep counting them as the latest steps (and refuse to save those
steps again). Nothing is moved unless an older checkpoint restored, so the last
good checkpoint is never lost; if none restores, the run stops and says so.

Because a resume is exact (the data position is the step), falling back one
checkpoint costs only the recomputation of its steps, not a different run.

A checkpoint of a different run (other batch size, model, optimizer, ...) is not
damage: that error is raised as it is, and nothing is moved.
"""

import time
from typing import Any, Callable, Optional

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from vit_jax import checkpoint
from vit_jax import validation

CORRUPT_DIR = 'corrupt_checkpoints'


class NoGoodCheckpointError(RuntimeError):
  """Every checkpoint of a workdir failed to restore."""


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, *,
                   workdir: str,
                   check_meta: Callable[[dict[str, Any]], None]
                   ) -> Optional[tuple[Any, dict[str, Any]]]:
  """(state, meta) of the newest intact checkpoint, or None if there is none.

  Args:
    manager: the workdir's checkpoint manager; reloaded if steps were moved.
    abstract_state: target shapes and shardings (see checkpoint.restore).
    workdir: where `corrupt_checkpoints/` goes.
    check_meta: raises if a checkpoint belongs to another run.
  Raises:
    NoGoodCheckpointError: checkpoints exist but none restores.
    validation.ConfigError: a checkpoint of another run (different batch size,
      model, optimizer, ...); nothing is moved.
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, meta = checkpoint.restore(manager, abstract_state, step,
                                       check_meta=check_meta)
      error = None
    except checkpoint.IncompatibleCheckpointError as e:
      raise validation.ConfigError(str(e)) from None
    except validation.ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      error = f'{type(e).__name__}: {_first_line(e)}'
    # Every process must pick the same step, even if only one saw the damage.
    if _all_processes_agree(error is None):
      break
    error = error or 'another process could not restore it'
    logging.warning('Checkpoint %s/%d is damaged (%s); trying an older one.',
                    manager.directory, step, error)
    damaged.append((step, error))
  else:
    if damaged:
      raise NoGoodCheckpointError(
          f'No checkpoint in {manager.directory} restores: '
          + '; '.join(f'step {s}: {e}' for s, e in damaged)
          + '. They were left in place. Move them elsewhere to start this '
          'workdir from scratch, or use a new --workdir.')
    return None

  for bad_step, error in damaged:
    moved = _move_aside(manager.directory, bad_step, workdir)
    logging.warning('Resuming from step %d instead of damaged checkpoint %s/%d, '
                    'which was moved to %s (%s).', step, manager.directory,
                    bad_step, moved, error)
  if damaged:
    manager.reload()
  return state, meta


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [''])[0][:300]


def _all_processes_agree(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _move_aside(directory: epath.Path, step: int, workdir: str) -> epath.Path:
  """Renames `directory/step` to `workdir/corrupt_checkpoints/<step>-<time>`."""
  stamp = time.strftime('%Y%m%dT%H%M%S', time.gmtime())
  target = epath.Path(workdir) / CORRUPT_DIR / f'{step}-{stamp}'
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
      (epath.Path(directory) / str(step)).rename(target)
    except Exception as e:  # pylint: disable=broad-except  (OSError, tf errors)
      raise NoGoodCheckpointError(
          f'Could not move damaged checkpoint {directory}/{step} aside ({e}); '
          f'move it out of {directory} by hand and rerun.') from e
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'moved damaged checkpoint {step}')
  return target
