"""The k best checkpoints of a run by one metric (`config.checkpoint.keep_best`).

Beside `checkpoints/` (the latest `config.checkpoint.keep` train states, what a
resume starts from) a run with `keep_best = k > 0` keeps the params (and EMA
params) of the k evaluated steps that scored best on
`config.checkpoint.best_metric` in `checkpoints_best/<step>/`. An Orbax
`CheckpointManager` with that metric as its `best_fn` writes them (each save
atomic, as for the train state) and deletes the one that falls out of the top
k; the score of each kept step is in its `meta` JSON, so a restarted run ranks
against the steps it kept before. Only a step that enters the top k is
written. The tools read the best with `--step=best` (`load_params(workdir,
'best')`).
"""

from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp

from vit_jax import config_checks
from vit_jax.checkpoint import orbax_state
from vit_jax.checkpoint.orbax_state import BEST_DIR
from vit_jax.config_checks import require

ITEM_NAMES = ('params', 'ema_params', 'meta')
MODES = ('auto', 'max', 'min')
# Logged metric names a run may rank by: eval_<split>_{top1,top5,loss}[_ema]
# is built from the eval splits; few-shot names end in 'shot'.
_METRIC_SUFFIXES = ('_top1', '_top5', '_loss')


def check_config(config: ml_collections.ConfigDict,
                 logged_names: list[str]) -> None:
  """Raises ConfigError for keep_best settings that cannot rank anything.

  Args:
    logged_names: the metric names the run's evaluations will log.
  """
  ckpt = config.checkpoint
  require(config_checks.is_int(ckpt.keep_best) and ckpt.keep_best >= 0,
          f'config.checkpoint.keep_best must be an integer >= 0, got '
          f'{ckpt.keep_best!r}')
  config_checks.one_of(ckpt.best_mode, MODES, 'checkpoint.best_mode')
  if ckpt.keep_best:
    require(ckpt.best_metric in logged_names,
            f'config.checkpoint.best_metric {ckpt.best_metric!r} is not a metric '
            'this run evaluates; it logs ' + ', '.join(logged_names))


def higher_is_better(metric: str, mode: str = 'auto') -> bool:
  """'auto': a loss is better lower, anything else (top-1, few-shot) higher."""
  if mode == 'auto':
    return not metric.removesuffix('_ema').endswith('_loss')
  return mode == 'max'


def best_dir(path: str | epath.PathLike) -> epath.Path:
  """`workdir/checkpoints_best` (absolute) of a workdir, its checkpoints/ or
  that directory itself."""
  return orbax_state.checkpoint_dir(path).parent / BEST_DIR


class BestCheckpoints:
  """Keeps the params of the `keep` best-scoring evaluated steps of a run."""

  def __init__(self, workdir: str, *, keep: int, metric: str, mode: str,
               meta: dict[str, Any]):
    self.metric, self._keep, self._meta = metric, keep, meta
    self._higher = higher_is_better(metric, mode)
    sign = 1.0 if self._higher else -1.0
    self._manager = ocp.CheckpointManager(
        best_dir(workdir), item_names=ITEM_NAMES,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            best_fn=lambda metrics: sign * metrics[metric], best_mode='max',
            keep_checkpoints_without_metrics=False))
    self.scores = {step: self._read_score(step)
                   for step in self._manager.all_steps()}

  def _read_score(self, step: int) -> float:
    meta = self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']
    if meta.get('best_metric') != self.metric:
      raise config_checks.ConfigError(
          f'{self._manager.directory}/{step} was ranked by '
          f'{meta.get("best_metric")!r}, this run ranks by {self.metric!r}: '
          'restore config.checkpoint.best_metric, or move '
          f'{self._manager.directory} away.')
    return float(meta['best_value'])

  def _enters(self, score: float) -> bool:
    if len(self.scores) < self._keep:
      return True
    worst = (min if self._higher else max)(self.scores.values())
    return score > worst if self._higher else score < worst

  def offer(self, state: Any, metrics: dict[str, float]) -> bool:
    """Saves `state`'s params if `metrics[metric]` enters the top k; True if so."""
    step, score = int(jax.device_get(state.step)), float(metrics[self.metric])
    if step in self.scores or not self._enters(score):
      return False
    items = {'params': ocp.args.StandardSave(state.params)}
    if getattr(state, 'ema_params', None) is not None:
      items['ema_params'] = ocp.args.StandardSave(state.ema_params)
    # The digest (as the train checkpoint of this step has it) identifies the
    # params, e.g. for linear_probe's feature cache.
    meta = dict(self._meta, best_metric=self.metric, best_value=score,
                best_higher=self._higher, digest=orbax_state.digest(state))
    self._manager.save(step, metrics={self.metric: score},
                       args=ocp.args.Composite(**items,
                                               meta=ocp.args.JsonSave(meta)))
    self.scores[step] = score
    for old in sorted(self.scores, key=self.scores.get,
                      reverse=self._higher)[self._keep:]:
      del self.scores[old]  # The manager deletes it after this save commits.
    logging.info('Best checkpoints by %s: %s', self.metric, ', '.join(
        f'step {s} {v:.4f}' for s, v in self.ranked()))
    return True

  def ranked(self) -> list[tuple[int, float]]:
    """(step, score) of the kept steps, best first."""
    return sorted(self.scores.items(), key=lambda kv: kv[1],
                  reverse=self._higher)

  def wait(self) -> None:
    """Returns once a best step's save in flight is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def best_step(path: str | epath.PathLike) -> tuple[epath.Path, int]:
  """(the best directory, its best step) of a workdir that kept best checkpoints.

  Raises:
    FileNotFoundError: the run kept none (config.checkpoint.keep_best = 0).
  """
  directory = best_dir(path)
  steps = ([int(p.name) for p in directory.iterdir() if p.name.isdigit()]
           if directory.exists() else [])
  if not steps:
    raise FileNotFoundError(
        f'no best checkpoints at {directory} (the run had '
        'config.checkpoint.keep_best = 0); use --step=<number> or the latest')
  with ocp.CheckpointManager(
      directory, item_names=ITEM_NAMES,
      options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    metas = {s: manager.restore(s, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta'] for s in manager.all_steps()}
  pick = max if next(iter(metas.values()))['best_higher'] else min
  return directory, pick(metas, key=lambda s: metas[s]['best_value'])
