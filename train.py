"""Trains a Vision Transformer: `python train.py --config=configs/X.py --workdir=DIR`.

Any config value can be overridden on the command line
(`--config.batch_size=64 --config.model.name=ViT-S_16`); a misspelt key is an
error. Running again with the same workdir resumes from its latest checkpoint.
SIGTERM (a preemption notice) saves after the current step and exits 0; a
NaN/Inf loss exits 1 naming the step (docs/resume.md).

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
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Before anything starts JAX's backends (distributed init included).
  from vit_jax import startup  # pylint: disable=g-import-not-at-top
  try:
    startup.prepare_process(_CONFIG.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
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
  from vit_jax import config_checks  # pylint: disable=g-import-not-at-top
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if jax.process_count() > 1:
      # Leave together, while every process is alive, not in atexit hooks
      # racing other threads' teardown (seen to abort one process of a pair).
      multihost_utils.sync_global_devices('vit_jax: training done')
      jax.distributed.shutdown()
  except config_checks.ConfigError as e:
    # What to change, without a traceback: nothing was compiled or written.
    raise app.UsageError(str(e)) from None
  except FloatingPointError as e:
    # The message names the step and what to change; checkpoints are intact.
    logging.error('%s', e)
    sys.exit(1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  from vit_jax import config_keys  # pylint: disable=g-import-not-at-top
  try:  # Before absl parses them: it could only say the old key is unknown.
    config_keys.check_flags(sys.argv)
  except ValueError as e:
    sys.exit(f'error: {e}')
  app.run(main)
