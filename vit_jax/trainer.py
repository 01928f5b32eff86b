"""The training loop: `train_and_evaluate(config, workdir)`.

Reads top to bottom in the order things happen: checks -> mesh -> input ->
model and optimizer -> sharded init or resume -> compiled steps -> loop (train,
log, evaluate, checkpoint) -> final evaluation. Everything that can be wrong with
the config, data or workdir is reported before anything is compiled.
"""

import math
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections

from vit_jax import checkpoint
from vit_jax import data
from vit_jax import evaluation
from vit_jax import fewshot
from vit_jax import flops
from vit_jax import metrics
from vit_jax import parallel
from vit_jax import preemption
from vit_jax import refusals
from vit_jax import run_setup
from vit_jax import steps
from vit_jax import workdir as workdir_lib
from vit_jax.models.precision import get_policy
from vit_jax.checkpoint import best
from vit_jax.checkpoint import orbax_state


def resolve_total_steps(config: ml_collections.ConfigDict, num_train: int) -> int:
  """`total_steps`, or `total_epochs` over the train split at `batch_size`."""
  if config.total_steps is not None:
    return int(config.total_steps)
  return max(1, math.ceil(config.total_epochs * num_train / config.batch_size))


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, float]:
  """Trains (or resumes) the configured model in `workdir`; returns final metrics.

  A SIGTERM (preemption notice) while it runs makes it finish the current step,
  save a checkpoint and return early (vit_jax.preemption); running it again
  resumes exactly there. A NaN/Inf loss or gradient norm raises
  FloatingPointError unless `config.train.nan_policy` is 'skip_step'.
  """
  # A start refused before anything was written leaves no empty workdir.
  with (preemption.PreemptionWatch() as preempted,
        workdir_lib.removed_if_unused(workdir)):
    return _train_and_evaluate(config, workdir, preempted)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        preempted: preemption.PreemptionWatch) -> dict[str, float]:
  # ----------------------------------------------------------------- checks
  # Everything here is cheap: a bad config fails in seconds, not after a compile.
  # A refusal on one process is one on all, before their first collective.
  with refusals.agreed_by_all_processes():
    run_setup.check_config(config)
    workdir = workdir_lib.prepare_workdir(workdir)
    mesh = parallel.make_mesh(data=config.mesh.data, model=config.mesh.model)
    parallel.check_batch_size(config.batch_size, mesh, config.train.accum_steps)
    parallel.check_batch_size(config.eval.batch_size, mesh)
    info = data.get_dataset_info(config)  # Refuses empty splits too.
    total_steps = resolve_total_steps(
        config, info.num_examples[config.input.train_split])
    eval_splits = data.eval_splits(config)
    fewshot_tasks = fewshot.prepare(config)  # Opens and checks their data.
    logging.info('Dataset %s: %d classes, splits %s; %d steps of batch %d on %d '
                 'devices (%d processes)', info.name, info.num_classes,
                 info.num_examples, total_steps, config.batch_size,
                 mesh.devices.size, jax.process_count())
    # Model and optimizer; also checks the parameter and sharding rules
    # against the model's names.
    run = run_setup.build(config, mesh, num_classes=info.num_classes,
                          total_steps=total_steps)
  is_main = jax.process_index() == 0
  model, state_sharding = run.model, run.state_sharding

  # -------------------------------------- resume, or start (scratch/pretrained)
  manager = orbax_state.make_manager(workdir, max_to_keep=config.checkpoint.keep)
  meta = orbax_state.resume_meta(config)
  meta['total_steps'] = total_steps  # Resolved (total_epochs included).
  best_kept = None
  if config.checkpoint.keep_best:  # Reads the scores of the steps it kept.
    best_kept = best.BestCheckpoints(
        workdir, keep=config.checkpoint.keep_best,
        metric=config.checkpoint.best_metric, mode=config.checkpoint.best_mode,
        meta=meta)
  # The newest checkpoint that restores intact; damaged newer ones are moved
  # aside with a warning, one of another run is refused.
  restored = orbax_state.restore_latest(
      manager, run.abstract_state, workdir=workdir,
      check_meta=lambda meta: orbax_state.check_resume_meta(meta, config))
  if restored is not None:
    state, saved_meta = restored
    logging.info('Resumed from %s at step %d', manager.directory,
                 int(state.step))
    changed = orbax_state.duration_change(saved_meta, total_steps,
                                          int(jax.device_get(state.step)))
    if changed:
      logging.warning('%s', changed)
  else:
    state = jax.jit(run.init_fn, out_shardings=state_sharding)()
    if config.pretrained_path:
      params, _ = checkpoint.load_pretrained(  # Logs what it loaded/resized.
          config.pretrained_path,  # Sharded params may span hosts: gather.
          multihost_utils.process_allgather(state.params, tiled=True),
          keep_pre_logits=config.pretrained.keep_pre_logits,
          keep_head=config.pretrained.keep_head,
          posemb_method=config.pretrained.posemb_resize,
          filter_resize=config.pretrained.filter_resize,
          patch_resize=config.pretrained.patch_resize)
      state = state.replace(params=jax.device_put(params, state_sharding.params))
      if state.ema_params is not None:  # The average starts at the loaded params.
        state = state.replace(
            ema_params=jax.device_put(params, state_sharding.ema_params))
  start_step = int(jax.device_get(state.step))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model %s: %s parameters', config.model.name, f'{num_params:,}')

  # --------------------------------------------------------- compiled steps
  train_step = steps.jit_train_step(config, model, run.tx,
                                    num_classes=info.num_classes, mesh=mesh,
                                    state_sharding=state_sharding)
  # The EMA is sharded like the params: the same eval_step serves both.
  eval_step = steps.jit_eval_step(model, num_classes=info.num_classes,
                                  mesh=mesh, params_sharding=state_sharding.params)
  fewshot_eval = (fewshot.Evaluator(config, fewshot_tasks, mesh,
                                    state_sharding.params)
                  if fewshot_tasks else None)
  fewshot_every = config.fewshot.every or config.eval_every
  batch_sharding = parallel.batch_sharding(mesh)
  batch_spec = {
      'image': jax.ShapeDtypeStruct((config.batch_size,) + run.image_shape,
                                    jnp.float32, sharding=batch_sharding),
      'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32,
                                    sharding=batch_sharding)}
  t0 = time.time()
  lowered = train_step.lower(run.abstract_state, batch_spec)
  train_step = lowered.compile()
  step_flops = flops.train_step_flops(lowered, model, run.image_shape,
                                      config.batch_size, config.train.accum_steps)
  logging.info('Compiled the train step in %.1fs (%.3g FLOP/step)',
               time.time() - t0, step_flops or float('nan'))

  # ------------------------------------------------------------------ loop
  writer = metrics.MetricsLogger(workdir, enabled=is_main, resume_step=start_step)
  timer = metrics.StepTimer(
      config.batch_size, flops_per_step=step_flops, num_devices=mesh.devices.size,
      peak_flops_per_device=flops.peak_flops_per_device(
          jax.devices()[0], override=config.metrics.peak_flops,
          product_dtype=get_policy(config.model.get('precision') or 'float32'
                                   ).product_dtype))
  train_iter = data.train_iterator(
      config, local_batch_size=parallel.local_batch_size(config.batch_size),
      process_index=jax.process_index(), process_count=jax.process_count(),
      start_step=start_step)
  final = {}
  preempted_at = None

  def evaluate_all(step: int, *, splits: bool = True,
                   few_shot: bool = True) -> None:
    """Evaluates (the eval splits, the few-shot probes), then offers the step
    to the best checkpoints if its score is among the results."""
    results = [evaluation.evaluate(eval_step, state.params, config, split, mesh,
                                   ema_params=state.ema_params)
               for split in (eval_splits if splits else ())]
    if few_shot and fewshot_eval is not None:
      results.append(fewshot_eval(state.params))
    for result in results:
      writer.write(step, result)
      final.update(result)
      logging.info('step %d: %s', step, ', '.join(
          f'{k} {v:.4f}' for k, v in result.items()))
    scores = {k: v for result in results for k, v in result.items()}
    if best_kept is not None and best_kept.metric in scores:
      best_kept.offer(state, scores)

  def stop_if_nonfinite() -> None:
    # Before anything computed after a NaN/Inf step is logged, evaluated or
    # saved; a save still in flight holds an earlier, finite state: finish it.
    try:
      steps.check_finite(state, config.train.nan_policy)
    except FloatingPointError:
      manager.wait_until_finished()
      raise

  def save_checkpoint() -> None:
    stop_if_nonfinite()
    orbax_state.save(manager, state, meta)

  try:  # A save in flight is finished, not lost, whatever ends the loop.
    for step in range(start_step + 1, total_steps + 1):
      batch = parallel.to_global_batch(next(train_iter), mesh)
      state, step_metrics = train_step(state, batch)

      if step == start_step + 1:
        jax.block_until_ready(state)
        timer.reset(step)  # Throughput excludes the first (compile-bound) step.
      if step % config.log_every == 0 or step == total_steps:
        stop_if_nonfinite()
        scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        scalars['learning_rate'] = float(run.schedule(step - 1))
        scalars.update(timer.lap(step))
        writer.write(step, scalars)
        logging.info(metrics.format_progress(
            step, total_steps, scalars, timer.elapsed_s,
            scalars.get('steps_per_sec', 0.0)))
      saved = step % config.checkpoint_every == 0 or step == total_steps
      if saved:  # Before evaluating: an error there cannot cost this step.
        save_checkpoint()
        timer.reset(step)
      due_eval = step % config.eval_every == 0 or step == total_steps
      due_fewshot = fewshot_eval is not None and (
          step % fewshot_every == 0 or step == total_steps)
      if due_eval or due_fewshot:
        stop_if_nonfinite()
        if saved:  # On disk before the evaluation reads its data.
          manager.wait_until_finished()
        evaluate_all(step, splits=due_eval, few_shot=due_fewshot)
        timer.reset(step)
      if preempted.reached(step):  # Every step, on every process (same answer).
        if not saved:
          save_checkpoint()
        preempted_at = step
        break
  except BaseException:
    manager.wait_until_finished()
    if best_kept is not None:
      best_kept.wait()
    raise

  # ----------------------------------------------------------------- finish
  if start_step >= total_steps:  # Rerun of a finished workdir: report, train nothing.
    logging.info('Workdir already holds step %d of %d', start_step, total_steps)
    evaluate_all(start_step)
  manager.wait_until_finished()  # A preemption's save is complete before we return.
  manager.close()
  if best_kept is not None:
    best_kept.close()
  writer.close()
  if preempted_at is not None:
    logging.warning('Preempted: saved step %d of %d in %s; run the same command '
                    'to resume.', preempted_at, total_steps, manager.directory)
    return final
  if is_main and config.metrics.write_plot:
    metrics.save_curves_plot(workdir)
  logging.info('Done at step %d: %s', total_steps, final)
  return final
