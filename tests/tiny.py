"""A tiny, fast training config on scikit-learn's digits, shared by the tests."""

import os

from absl import flags
from ml_collections import config_flags

from configs import common
from vit_jax import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quickstart_on_digits(data_dir, *extra: str, conv_stem: str = '()',
                         patch_size: str = '(4,4)', cpu_devices: int = 0
                         ) -> list[str]:
  """Command-line flags: configs/quickstart.py on 16 px digits, without its extras.

  By default the quickstart's conv stem becomes plain 4x4 patches and its two
  CPU devices JAX's own, so a test's run is small and leaves the device count
  alone. The tuple fields are arguments rather than `extra` flags because a
  tuple override given twice is concatenated, not replaced.
  """
  return [f'--config={ROOT}/configs/quickstart.py', '--config.dataset=digits',
          f'--config.input.data_dir={data_dir}', '--config.input.image_size=16',
          f'--config.model.patch_size={patch_size}',
          f'--config.model.conv_stem={conv_stem}',
          f'--config.mesh.cpu_devices={cpu_devices}', *extra]


def tiny_config(data_dir, **overrides):
  """A few steps of a tiny ViT on scikit-learn's digits, upsampled to 16 px.

  `overrides` are run-level keys (`total_steps=4`) or sections as dicts, merged
  into the section (`train={'ema_decay': 0.9}`); the config is locked first,
  so a key that does not exist is an error.
  """
  config = common.get_config()
  config.model = models.model_section('ViT-test_4')
  config.dataset = 'digits'
  config.input.data_dir = str(data_dir)
  config.input.image_size = 16
  config.input.channels = 1
  config.pp.train_crop = 'resize'
  config.batch_size = 32
  config.eval.batch_size = 64
  config.total_steps = 8
  config.optim.name = 'adamw'
  config.schedule.base_lr = 1e-3
  config.schedule.warmup_steps = 2
  config.log_every = 2
  config.eval_every = 4
  config.checkpoint_every = 4
  config.metrics.write_plot = False
  config.lock()  # First: a misspelt or moved key in `overrides` is an error.
  config.update(overrides)
  return config


def step_config(**overrides):
  """Default keys plus AdamW at 1e-3: what step-level tests build steps from.

  `overrides` as in `tiny_config`: run-level keys, or a section as a dict
  (`train={'accum_steps': 2}`).
  """
  config = common.get_config()
  config.optim.name = 'adamw'
  config.schedule.base_lr = 1e-3
  config.schedule.warmup_steps = 1
  config.optim.weight_decay = 0.01
  config.lock()
  config.update(overrides)
  return config


# What a run needs to take seconds: 8 simulated devices, 16 mock examples, a
# one-layer ViT-test_4 on 8 px inputs (2x2 patches).
SHRINK = dict(batch_size=16, total_steps=3, log_every=1, eval_every=3,
              checkpoint_every=3, eval={'batch_size': 16},
              input={'image_size': 8, 'tfds_reader': 'as_dataset',
                     'shuffle_buffer': 16},
              metrics={'write_plot': False})


def parse_config(spec: str):
  """The config `train.py --config=configs/<spec>` gets (locked)."""
  fv = flags.FlagValues()
  argv = ['train.py', f'--config={ROOT}/configs/{spec}']
  config_flags.DEFINE_config_file('config', flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config
