"""Trains a Vision Transformer: `python train.py --config=configs/X.py --workdir=DIR`.

Any config value can be overridden on the command line
(`--config.batch_size=64 --config.model.name=ViT-S_16`); a misspelt key is an
error. Running again with the same workdir resumes from its latest checkpoint.
SIGTERM (a preemption notice) saves after the current step and exits 0; a
NaN/Inf loss exits 1 naming the step (docs/resume.md).

A refused config, file or input prints one `error: ...` line and exits 1 (a
malformed command line: 2), before anything compiles where the data allows;
`--verbose` (or VIT_JAX_VERBOSE=1) adds the traceback (vit_jax/refusals.py).

Multi-process runs on GPU clusters or one machine pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`; on TPU pod
slices and under SLURM JAX finds its peers by itself (pass `--distributed`).
Commands for each setting, and batch/sharding settings that fit B/16 and L/16:
docs/launch.md.
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
from ml_collections import config_flags

from vit_jax import refusals

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file (see configs/).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0 for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() with no arguments '
    '(TPU pod slices, SLURM).')
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    'local_device_ids', None, 'Devices this process uses, e.g. 0,1,2,3. Under '
    'SLURM JAX otherwise gives each process only GPU $SLURM_LOCALID (one task '
    'per GPU); one task per node with all its GPUs needs this.')


def main(argv):
  if len(argv) > 1:
    sys.exit(refusals.print_refusal(
        refusals.UsageError(f'unexpected arguments: {argv[1:]}')))
  if refusals.run_refusing(lambda: _train(_CONFIG.value, _WORKDIR.value),
                           sys.argv):
    sys.exit(1)


def _train(config, workdir: str) -> None:
  # Before anything starts JAX's backends (distributed init included).
  from vit_jax import startup  # pylint: disable=g-import-not-at-top
  startup.prepare_process(config)
  if _COORDINATOR.value or _DISTRIBUTED.value:
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
        local_device_ids=([int(i) for i in _LOCAL_DEVICE_IDS.value]
                          if _LOCAL_DEVICE_IDS.value else None))
  # Imported after jax.distributed.initialize: nothing may touch devices before it.
  from vit_jax import trainer  # pylint: disable=g-import-not-at-top
  logging.info('JAX process %d/%d, %d local / %d global devices',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  try:
    trainer.train_and_evaluate(config, workdir)
  except FloatingPointError as e:
    # The message names the step and what to change; checkpoints are intact.
    raise ValueError(str(e)) from None
  if jax.process_count() > 1:
    # Leave together, while every process is alive, not in atexit hooks
    # racing other threads' teardown (seen to abort one process of a pair).
    multihost_utils.sync_global_devices('vit_jax: training done')
    jax.distributed.shutdown()


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=refusals.absl_flags_parser)
