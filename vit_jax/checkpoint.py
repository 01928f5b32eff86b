"""Checkpoints: Orbax train-state checkpoints and the released `.npz` format.

A workdir holds `checkpoints/<step>/` written by an Orbax `CheckpointManager`
with three items: `params`, `train` (step, optimizer state, rng) and `meta` (JSON:
the config and what is needed to check that a resume is consistent). Keeping
`params` apart lets `load_params` read a model without its optimizer state.

The `.npz` functions (`save_npz`, `load_npz`, `load_pretrained`, `resize_posemb`)
live in vit_jax.checkpoint_npz and are re-exported here.
"""

from typing import Any, Optional

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from vit_jax.checkpoint_npz import LoadReport  # noqa: F401  (re-export)
from vit_jax.checkpoint_npz import load_npz  # noqa: F401
from vit_jax.checkpoint_npz import load_pretrained  # noqa: F401
from vit_jax.checkpoint_npz import resize_posemb  # noqa: F401
from vit_jax.checkpoint_npz import save_npz  # noqa: F401

CHECKPOINT_DIR = 'checkpoints'


def checkpoint_dir(path: str) -> epath.Path:
  """`path` itself if it is a checkpoints dir, else `path/checkpoints`."""
  path = epath.Path(path)
  return path if path.name == CHECKPOINT_DIR else path / CHECKPOINT_DIR


def make_manager(workdir: str, *, max_to_keep: int = 3,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """The manager of `workdir/checkpoints` (created if missing)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options,
      item_names=('params', 'train', 'meta'))


def save(manager: ocp.CheckpointManager, state: Any, meta: dict[str, Any]) -> None:
  """Saves `state` (a steps.TrainState) at its step, asynchronously."""
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      train=ocp.args.StandardSave(
          {'step': state.step, 'opt_state': state.opt_state, 'rng': state.rng}),
      meta=ocp.args.JsonSave(meta)))


def restore(manager: ocp.CheckpointManager, abstract_state: Any,
            step: Optional[int] = None) -> tuple[Any, dict[str, Any]]:
  """Restores the state at `step` (default latest) into `abstract_state`'s shardings.

  Args:
    abstract_state: a TrainState of `jax.ShapeDtypeStruct`s with shardings, e.g.
      `jax.eval_shape` of the init function with shardings attached.
  Returns:
    (state, meta).
  """
  step = manager.latest_step() if step is None else step
  train_target = {'step': abstract_state.step,
                  'opt_state': abstract_state.opt_state, 'rng': abstract_state.rng}
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_state.params),
      train=ocp.args.StandardRestore(train_target),
      meta=ocp.args.JsonRestore()))
  train = restored['train']
  state = abstract_state.replace(
      step=train['step'], params=restored['params'],
      opt_state=train['opt_state'], rng=train['rng'])
  return state, restored['meta']


def load_params(path: str, step: Optional[int] = None) -> dict[str, Any]:
  """The params tree saved in a workdir (or its checkpoints/ dir), as numpy.

  Args:
    path: a training workdir or its `checkpoints` directory.
    step: the step to read; default the latest.
  """
  directory = checkpoint_dir(path)
  if not directory.exists():
    raise FileNotFoundError(f'no checkpoints at {directory}')
  with ocp.CheckpointManager(directory, item_names=('params', 'train', 'meta'),
                             options=ocp.CheckpointManagerOptions(read_only=True)
                             ) as manager:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f'no checkpoints at {directory}')
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise ValueError(f'no checkpoint for step {step} in {directory}; have {sorted(steps)}')
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore()))
  logging.info('Loaded params of step %d from %s', step, directory)
  return jax.tree.map(np.asarray, restored['params'])
