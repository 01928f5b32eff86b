"""Read-only loading of a workdir's checkpoints: its params and its `meta`.

Kept apart from orbax_state.py, which owns the training run's own state (save,
verified restore, resume). The tools (evaluate, export, linear probe, fine-tune
from a workdir) only read a workdir: they build no train state or optimizer to
restore into, and must never write to it (it may belong to a run that is still
going). So the manager here is opened `read_only`, and `params` are restored by
their saved metadata alone, which works because orbax_state.py saves them as
an item of their own.
"""

from typing import Any, Callable

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from vit_jax.checkpoint.orbax_state import ITEM_NAMES
from vit_jax.checkpoint.orbax_state import checkpoint_dir


def load_params(path: str, step: int | str | None = None, *,
                ema: bool = False) -> dict[str, Any]:
  """The params tree saved in a workdir (or its checkpoints/ dir), as numpy.

  Works on any device count: the arrays are restored onto one host CPU device,
  so params saved sharded over 8 accelerators load on a laptop.

  Args:
    path: a training workdir or its `checkpoints` directory.
    step: the step to read; default the latest; 'best' the best-scoring
      one kept by `config.checkpoint.keep_best`.
    ema: read the EMA of the params (runs with `config.train.ema_decay` > 0) instead.
  Raises:
    ValueError: `ema` and the checkpoint has no EMA params.
  """
  item = 'ema_params' if ema else 'params'

  def args(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    metadata = manager.item_metadata(step)
    if metadata.get(item) is None:
      raise ValueError(f'{manager.directory}/{step} has no {item} (the run '
                       'had config.train.ema_decay = 0)')
    host = jax.sharding.make_single_device_sharding(
        jax.local_devices(backend='cpu')[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host),
        metadata[item])
    return {item: ocp.args.StandardRestore(target)}

  step, restored = _restore_read_only(path, step, args)
  logging.info('Loaded %s of step %d from %s', item, step, checkpoint_dir(path))
  return jax.tree.map(np.asarray, restored[item])


def load_meta(path: str, step: int | str | None = None) -> dict[str, Any]:
  """The `meta` JSON of a workdir's checkpoint (its config under 'config')."""
  _, restored = _restore_read_only(
      path, step, lambda manager, step: {'meta': ocp.args.JsonRestore()})
  return restored['meta']


def _restore_read_only(
    path: str, step: int | str | None,
    make_args: Callable[[ocp.CheckpointManager, int], dict[str, Any]]
) -> tuple[int, Any]:
  """(step, items) restored from `step` (default latest; 'best': the best
  kept by config.checkpoint.keep_best) of a workdir."""
  if step == 'best':
    from vit_jax.checkpoint import best  # pylint: disable=g-import-not-at-top
    path, step = best.best_step(path)
  directory = checkpoint_dir(path)
  if not directory.exists():
    raise FileNotFoundError(f'no checkpoints at {directory}')
  with ocp.CheckpointManager(
      directory, item_names=ITEM_NAMES,
      item_handlers={'params': ocp.StandardCheckpointHandler(),
                     'ema_params': ocp.StandardCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f'no checkpoints at {directory}')
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise ValueError(f'no checkpoint for step {step} in {directory}; have {sorted(steps)}')
    restored = manager.restore(step, args=ocp.args.Composite(
        **make_args(manager, step)))
  return step, restored
