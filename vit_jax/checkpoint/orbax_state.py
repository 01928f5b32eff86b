"""Orbax train-state checkpoints of a workdir, and resuming from them.

A workdir holds `checkpoints/<step>/` written by an Orbax `CheckpointManager`
with the items `params`, `train` (step, optimizer state, rng, non-finite
counters), `meta` (JSON: the config and the run's identity) and, with an EMA
(`config.train.ema_decay` > 0), `ema_params`. Keeping `params` apart lets
the tools read a model without its optimizer state (workdir_reader.py, which
owns the read-only loading).

Orbax writes each step into a temporary directory and renames it when complete,
so a killed save leaves no half-written `<step>/`. What a rename cannot catch
(a file truncated or garbled later) is caught on restore: `meta` records the
state's layout (name -> shape, dtype) and a digest of its bytes, and `restore`
checks both. `restore_latest` then falls back to the next older checkpoint and
moves the damaged newer ones to `<workdir>/corrupt_checkpoints/<step>-<time>/`,
never deleting them (the manager would otherwise keep counting them as the
latest steps). Nothing is moved unless an older checkpoint restored; if none
does, the run stops and says so. A checkpoint of another run (batch size,
model, optimizer, ...) is not damage: it is refused, and nothing is moved.
"""

import dataclasses
import json
import time
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vit_jax import config_keys
from vit_jax.config_checks import ConfigError

CHECKPOINT_DIR = 'checkpoints'
BEST_DIR = 'checkpoints_best'
CORRUPT_DIR = 'corrupt_checkpoints'
# Config values that define the training stream: changing one between a run and
# its resume would silently produce a different run.
_RESUME_KEYS = ('batch_size', 'seed', 'dataset', 'input.train_split',
                'train.accum_steps', 'input.image_size', 'train.ema_decay')
# Keys added after checkpoints were written without them: the value those had.
_RESUME_DEFAULTS = {'train.ema_decay': 0.0}
ITEM_NAMES = ('params', 'ema_params', 'train', 'meta')


def checkpoint_dir(path: str) -> epath.Path:
  """`path` itself if it is a checkpoints dir, else `path/checkpoints`.

  Local paths are made absolute: Orbax's tensorstore refuses relative ones, and
  `--workdir=runs/x` is how people type them.
  """
  path = epath.Path(path)
  if '://' not in str(path):
    path = path.absolute()
  # checkpoints_best/ (vit_jax.checkpoint.best) is read like checkpoints/.
  return path if path.name in (CHECKPOINT_DIR, BEST_DIR) else path / CHECKPOINT_DIR


# Orbax saves a replicated array "replica-parallel" by default (not on GPUs):
# each replica writes one slice, and every slice is a small jitted program,
# compiled once per array shape and device, which made the first save of a
# run slow on many devices (docs/benchmarks.md). Slices under 1 MiB are
# written by one replica; large arrays still save in parallel.
MIN_REPLICA_SLICE_BYTES = 2**20


def _register_array_handler() -> None:
  # The default handler's only other setting is its array-metadata store,
  # which orbax does not export: keep the one it made.
  default = ocp.type_handlers.get_type_handler(jax.Array)
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          array_metadata_store=getattr(default, '_array_metadata_store', None),
          min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
      override=True)


_register_array_handler()


def make_manager(workdir: str, *, max_to_keep: int = 3,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """The manager of `workdir/checkpoints` (created if missing).

  Temporary directories of saves that never finished (the process was killed)
  are removed at start. Old steps are removed only after a newer save has
  been committed, so the newest complete checkpoint always survives.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options,
      item_names=ITEM_NAMES)


class CorruptCheckpointError(ValueError):
  """A checkpoint that cannot be read, or whose bytes differ from what was saved."""


class IncompatibleCheckpointError(ValueError):
  """A readable checkpoint of another model or optimizer (not a damaged one)."""


def _train_item(state: Any) -> dict[str, Any]:
  """Every TrainState field but the params: step, opt_state, rng, counters."""
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
          if f.name not in ('params', 'ema_params')}


def _array_items(state: Any) -> dict[str, Any]:
  """The saved array items; `ema_params` only if the state has them, so that a
  state without EMA has the layout and digest it had before EMA existed."""
  items = {'params': state.params, 'train': _train_item(state)}
  if getattr(state, 'ema_params', None) is not None:
    items['ema_params'] = state.ema_params
  return items


def layout(state: Any) -> dict[str, str]:
  """'item/path' -> 'shape dtype' for every array of a (possibly abstract) state."""
  items = _array_items(state)
  flat, _ = jax.tree_util.tree_flatten_with_path(items)
  return {jax.tree_util.keystr(path, simple=True, separator='/'):
          f'{tuple(x.shape)} {jnp.dtype(x.dtype).name}' for path, x in flat}


def _leaf_digest(x: jax.Array) -> jax.Array:
  """sum_i (2i+1) * word_i mod 2**32 over x's bytes read as unsigned words.

  Integer sums are exact, so the digest does not depend on how XLA orders the
  reduction or shards the array; odd weights make any single changed word
  change the digest, and weights by position catch moved blocks.
  """
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  width = jnp.dtype(x.dtype).itemsize
  words = jax.lax.bitcast_convert_type(
      x, {1: jnp.uint8, 2: jnp.uint16}.get(width, jnp.uint32))
  words = words.astype(jnp.uint32).ravel()
  weights = jnp.arange(words.size, dtype=jnp.uint32) * 2 + 1
  return jnp.sum(words * weights, dtype=jnp.uint32)


@jax.jit
def _tree_digest(tree: Any) -> jax.Array:
  leaves = [_leaf_digest(x) for x in jax.tree.leaves(tree)]
  weights = jnp.arange(len(leaves), dtype=jnp.uint32) * 2 + 1
  return jnp.sum(jnp.stack(leaves) * weights, dtype=jnp.uint32)


def digest(state: Any) -> dict[str, int]:
  """A 32-bit digest of the bytes of each saved item ('params', 'train', ...)."""
  items = _array_items(state)
  return {name: int(jax.device_get(_tree_digest(tree)))
          for name, tree in items.items()}


def save(manager: ocp.CheckpointManager, state: Any, meta: dict[str, Any]) -> None:
  """Saves `state` (a steps.TrainState) at its step, asynchronously.

  `meta` is stored with the state's layout and digest added, for `restore`.
  """
  step = int(jax.device_get(state.step))
  meta = dict(meta, layout=layout(state), digest=digest(state))
  arrays = {name: ocp.args.StandardSave(tree)
            for name, tree in _array_items(state).items()}
  manager.save(step, args=ocp.args.Composite(
      **arrays, meta=ocp.args.JsonSave(meta)))


def restore(manager: ocp.CheckpointManager, abstract_state: Any,
            step: int | None = None,
            check_meta: Callable[[dict[str, Any]], None] | None = None
            ) -> tuple[Any, dict[str, Any]]:
  """Restores the state at `step` (default latest) into `abstract_state`'s shardings.

  Reads `meta` first: `check_meta(meta)` may refuse the checkpoint (another
  run), and a layout that differs from `abstract_state`'s is reported as
  IncompatibleCheckpointError before any array is read, so a changed model is
  never mistaken for a damaged checkpoint.

  Args:
    abstract_state: a TrainState of `jax.ShapeDtypeStruct`s with shardings, e.g.
      `jax.eval_shape` of the init function with shardings attached.
    check_meta: raises if `meta` belongs to a different run.
  Returns:
    (state, meta).
  Raises:
    IncompatibleCheckpointError: another model or optimizer structure.
    CorruptCheckpointError: the restored bytes differ from the saved digest.
    Exception: whatever Orbax raises for unreadable files.
  """
  step = manager.latest_step() if step is None else step
  where = f'{manager.directory}/{step}'
  meta = manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))['meta']
  if check_meta is not None:
    check_meta(meta)
  if 'layout' in meta:
    _check_layout(where, meta['layout'], layout(abstract_state))
  restored = manager.restore(step, args=ocp.args.Composite(
      **{name: ocp.args.StandardRestore(tree)
         for name, tree in _array_items(abstract_state).items()}))
  state = abstract_state.replace(params=restored['params'], **restored['train'])
  if 'ema_params' in restored:
    state = state.replace(ema_params=restored['ema_params'])
  if 'digest' in meta and (found := digest(state)) != meta['digest']:
    raise CorruptCheckpointError(
        f'{where}: the restored arrays differ from the saved ones (digest '
        f'{found} != {meta["digest"]}); a file was changed or truncated')
  return state, meta


def _check_layout(where: str, saved: dict[str, str], current: dict[str, str]) -> None:
  if saved == current:
    return
  diffs = [f'{name}: checkpoint {saved.get(name, "absent")} vs config '
           f'{current.get(name, "absent")}'
           for name in sorted(set(saved) | set(current))
           if saved.get(name) != current.get(name)]
  shown = '\n  '.join(diffs[:10]) + (
      f'\n  ... and {len(diffs) - 10} more' if len(diffs) > 10 else '')
  raise IncompatibleCheckpointError(
      f'{where} holds a train state of another model or optimizer '
      f'({len(diffs)} arrays differ):\n  {shown}\nUse a new --workdir, or restore '
      'the model/optimizer settings of the run that wrote it.')


# ---------------------------------------------------------------- resume


def resume_meta(config: Any) -> dict[str, Any]:
  """What a checkpoint records so that a resume can check it is the same run."""
  meta = {key: config_keys.lookup(config, key) for key in _RESUME_KEYS}
  meta['model'] = config.model.name
  meta['config'] = config.to_json_best_effort()
  return meta


def check_resume_meta(meta: dict[str, Any], config: Any) -> None:
  """Raises ConfigError if the workdir's checkpoint was written by another run.

  Checkpoints written with the earlier flat key names are compared under the
  current ones (vit_jax.config_keys).
  """
  meta = config_keys.upgrade_flat(meta)
  current = resume_meta(config)
  saved = lambda k: meta.get(k, _RESUME_DEFAULTS.get(k))
  changed = [f'{k}: checkpoint {saved(k)!r} vs config {current[k]!r}'
             for k in (*_RESUME_KEYS, 'model') if saved(k) != current[k]]
  if changed:
    raise ConfigError(
        'this workdir holds a checkpoint of a different run (' + '; '.join(changed)
        + '). Use a new --workdir, or restore the original values.')


def duration_change(meta: dict[str, Any], total_steps: int,
                    start_step: int) -> str | None:
  """What resuming with another `total_steps` does, or None if unchanged.

  Extending (or shortening) a run is allowed, unlike a change of the data
  stream or the model (`check_resume_meta`): the schedule is a function of
  total_steps, so it is recomputed and the steps after `start_step` follow
  the new one. `meta` is the checkpoint's; older ones record the duration
  only in their config (None there: a run given in epochs, not compared).
  """
  saved = meta.get('total_steps')
  if saved is None:
    saved = json.loads(meta.get('config') or '{}').get('total_steps')
  if saved is None or int(saved) == total_steps:
    return None
  if start_step >= total_steps:
    then = f'step {start_step} already reaches it: nothing more is trained'
  else:
    then = (f'the learning-rate schedule is recomputed for {total_steps} '
            f'steps (warmup and decay stretched or shrunk), so steps '
            f'{start_step + 1}..{total_steps} follow the new schedule, not '
            f'the one steps 1..{start_step} followed')
  return (f'resuming at step {start_step} with total_steps {total_steps}; the '
          f'checkpoint was written by a run of total_steps {saved}: {then}.')


class NoGoodCheckpointError(RuntimeError):
  """Every checkpoint of a workdir failed to restore."""


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, *,
                   workdir: str,
                   check_meta: Callable[[dict[str, Any]], None]
                   ) -> tuple[Any, dict[str, Any]] | None:
  """(state, meta) of the newest intact checkpoint, or None if there is none.

  Args:
    manager: the workdir's checkpoint manager; reloaded if steps were moved.
    abstract_state: target shapes and shardings (see `restore`).
    workdir: where `corrupt_checkpoints/` goes.
    check_meta: raises if a checkpoint belongs to another run.
  Raises:
    NoGoodCheckpointError: checkpoints exist but none restores.
    ConfigError: a checkpoint of another run (different batch size,
      model, optimizer, ...); nothing is moved.
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, meta = restore(manager, abstract_state, step,
                            check_meta=check_meta)
      error = None
    except IncompatibleCheckpointError as e:
      raise ConfigError(str(e)) from None
    except ConfigError:
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
