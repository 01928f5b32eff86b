"""Test helper (never used for training): train.py with one injected fault.

    VIT_JAX_TEST_FAULT=kill_between:<step> python tests/train_with_faults.py <train.py flags>

Faults, chosen by the environment variable so the command line is the same as
train.py's (a restart uses exactly the same command):

  kill_between:<N>  SIGKILL when step N is done and the next batch is requested,
                    after any save in flight has finished (N must not be a
                    checkpoint step).
  kill_saving:<N>   SIGKILL right after the save of step N was started: Orbax
                    is still writing it in a background thread.
  kill_saved:<N>    SIGKILL once the checkpoint of step N is committed.
  nan:<N>[,<M>...]  the images of the batches of steps N, M, ... are NaN.

The same wrappers are used in-process by tests/test_reliability.py through
`install`.
"""

import os
import signal
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = 'VIT_JAX_TEST_FAULT'


def _kill_self() -> None:
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str | None, patch=None) -> None:
  """Wraps vit_jax.data.train_iterator / vit_jax.checkpoint.orbax_state.save for `fault`.

  Args:
    fault: 'kind:arg' as in the module docstring, or None for no fault.
    patch: `setattr`-like callable (pytest's monkeypatch.setattr); default
      plain setattr, for a subprocess that exits anyway.
  """
  if not fault:
    return
  from vit_jax import data  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoint import orbax_state  # pylint: disable=g-import-not-at-top
  patch = patch or setattr
  kind, arg = fault.split(':')
  steps = {int(s) for s in arg.split(',')}

  managers = []  # The trainer's checkpoint manager, seen through save().
  original_save = orbax_state.save

  def save(manager, state, meta):
    managers.append(manager)
    original_save(manager, state, meta)
    if kind in ('kill_saving', 'kill_saved') and int(state.step) in steps:
      if kind == 'kill_saved':
        manager.wait_until_finished()
      _kill_self()

  patch(orbax_state, 'save', save)
  if kind in ('kill_between', 'nan'):
    original_iterator = data.train_iterator

    def train_iterator(config, *, start_step=0, **kwargs):
      batches = original_iterator(config, start_step=start_step, **kwargs)
      # The batch at data position p is the batch of step p + 1.
      for position, batch in enumerate(batches, start_step):
        if kind == 'kill_between' and position in steps:
          for manager in managers[-1:]:
            manager.wait_until_finished()
          _kill_self()
        if kind == 'nan' and position + 1 in steps:
          batch = dict(batch, image=np.full_like(batch['image'], np.nan))
        yield batch

    patch(data, 'train_iterator', train_iterator)
  elif kind not in ('kill_saving', 'kill_saved'):
    raise ValueError(f'unknown fault {fault!r}')


def main() -> None:
  sys.path.insert(0, ROOT)
  os.chdir(ROOT)
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  import train  # pylint: disable=g-import-not-at-top
  install(os.environ.get(ENV))
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(train.main)


if __name__ == '__main__':
  main()
