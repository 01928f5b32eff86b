"""Config keys grouped by their reader: old names are refused with the new one,
and workdirs saved with the old names still resume and still load in the tools."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from configs import common
from vit_jax import config_keys
from vit_jax import models
from vit_jax import run_setup
from vit_jax import trainer
from vit_jax.checkpoint import workdir_reader
from vit_jax.config_checks import ConfigError
from vit_jax.tools import evaluate
from vit_jax.tools import loading

from tiny import ROOT
from tiny import tiny_config

# tiny_config(data_dir) as the flat layout saved it in a checkpoint's meta,
# before the keys were grouped (written out here, not derived from the table
# under test).
OLD_SAVED = {
    'seed': 0,
    'model': {'name': 'ViT-test_4', 'attention_dropout_rate': None,
              'attention_impl': None, 'classifier': None, 'conv_stem': None,
              'conv_stem_depth': None, 'dropout_rate': None, 'dtype': None,
              'head_bias_init': None, 'hidden_size': None, 'mlp_dim': None,
              'num_heads': None, 'num_layers': None, 'patch_size': None,
              'posemb': None, 'remat_policy': None, 'representation_size': None,
              'scan_layers': None, 'stochastic_depth': None},
    'pretrained_path': '', 'pretrained_keep_pre_logits': None,
    'pretrained_posemb_resize': 'linear', 'dataset': 'digits',
    'data_dir': 'DATA_DIR', 'train_split': 'train', 'eval_splits': 'test',
    'image_size': 16, 'channels': 1, 'shuffle_buffer': 50000, 'cache': True,
    'prefetch': 2, 'skip_bad_images': False, 'tfds_reader': 'shards',
    'pp': {'train_crop': 'resize', 'crop_padding': 4, 'area_min': 0.05,
           'flip': True, 'eval_crop_fraction': 1.0, 'randaugment_layers': 0,
           'randaugment_magnitude': 10.0, 'randaugment_rule': 'reference',
           'random_erase_prob': 0.0},
    'batch_size': 32, 'accum_steps': 1, 'total_steps': 8, 'total_epochs': None,
    'optim': {'name': 'adamw', 'momentum': 0.9, 'nesterov': False,
              'accumulator_dtype': 'float32', 'b1': 0.9, 'b2': 0.999,
              'eps': 1e-08},
    'lr': {'base': 0.001, 'schedule': 'cosine', 'warmup_steps': 2,
           'end_value': 0.0, 'timescale': 10000},
    'grad_clip_norm': 1.0, 'weight_decay': 0.0, 'wd_mask': '.*/kernel$',
    'frozen': '', 'lr_mults': [], 'layer_decay': 1.0, 'label_smoothing': 0.0,
    'mixup': {'mixup_alpha': 0.0, 'cutmix_alpha': 0.0, 'prob': 1.0,
              'switch_prob': 0.5},
    'ema_decay': 0.0, 'parallelism': 'jit', 'cpu_devices': 0,
    'mesh': {'data': -1, 'model': 1}, 'sharding': 'replicate',
    'fsdp_min_size': 262144, 'log_every': 2, 'eval_every': 4,
    'checkpoint_every': 4, 'keep_checkpoints': 3, 'nan_policy': 'stop',
    'eval_batch_size': 64, 'peak_flops': None, 'write_plot': False,
}
# The resume identity such a checkpoint recorded.
OLD_RESUME_KEYS = {'batch_size': 32, 'seed': 0, 'dataset': 'digits',
                   'train_split': 'train', 'accum_steps': 1, 'image_size': 16,
                   'ema_decay': 0.0, 'model': 'ViT-test_4'}


def test_every_moved_key_has_its_new_place():
  config = common.get_config()
  # A config's model section holds its variant's fields (models.model_section).
  config.model = models.model_section(config.model.name)
  for old, new in config_keys.RENAMED.items():
    config_keys.lookup(config, new)  # Raises if the new place is missing.
    section, _, leaf = old.partition('.')
    gone = section not in config or (leaf and leaf not in config[section])
    assert gone or old == 'sharding', old


@pytest.mark.parametrize('flag,new', [
    ('--config.lr.base=0.1', 'config.schedule.base_lr'),
    ('--config.weight_decay=0.1', 'config.optim.weight_decay'),
    ('--config.eval_splits=test', 'config.eval.splits'),
    ('--config.sharding=fsdp', 'config.sharding.rules'),
    ('--config.lr.bsae=0.1', 'config.schedule'),
    ('--config.model.dtype=bfloat16', 'config.model.precision .a precision policy'),
])
def test_old_flags_name_the_new_key(flag, new):
  with pytest.raises(ConfigError, match=f'is now {new}'):
    config_keys.check_flags(['train.py', flag])


def test_current_flags_pass():
  config_keys.check_flags(['train.py', '--config.sharding.rules=fsdp',
                           '--config.schedule.base_lr=0.1', '--workdir=x'])


def test_a_config_file_setting_an_old_key_is_refused():
  config = common.get_config()  # Unlocked, as a config file gets it.
  config.total_steps = 10
  config.weight_decay = 0.05  # Silently a new key in an unlocked ConfigDict.
  with pytest.raises(ConfigError, match='config.weight_decay is now '
                     'config.optim.weight_decay'):
    run_setup.check_config(config)


def test_the_evaluate_tool_refuses_a_config_with_an_old_key(tmp_path):
  config = tiny_config(tmp_path)
  config.unlock()
  config.image_size = 28  # Would leave config.input.image_size at 16.
  with pytest.raises(ConfigError, match='config.image_size is now '
                     'config.input.image_size'):
    evaluate.evaluate_checkpoint(config, str(tmp_path / 'no_workdir'))


def test_train_py_refuses_an_old_flag_before_starting(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'train.py'),
       '--config=configs/quickstart.py', f'--workdir={tmp_path}/w',
       '--config.lr.base=0.1'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 1
  assert 'error: --config.lr.base: config.lr.base is now config.schedule.base_lr' in (
      proc.stderr)
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'w').exists()


# Keys that came after the rename: a config saved before has none of them
# (readers fall back to their defaults: the model registry's, common.py's).
ADDED_SINCE = {
    'model': ('token_mixer', 'gelu_approximate', 'favor_features', 'favor_kernel',
              'favor_seed', 'afno_num_blocks', 'afno_sparsity_threshold',
              'afno_hard_thresholding_fraction', 'afno_hidden_size_factor',
              'afno_double_skip', 'tome_r', 'head_dim'),
    'pretrained': ('filter_resize', 'keep_head', 'patch_resize'),
    'input': ('max_image_pixels',),
    'checkpoint': ('keep_best', 'best_metric', 'best_mode')}
# Whole sections that came after it.
SECTIONS_ADDED_SINCE = ('quantization', 'pruning', 'fewshot')
KEYS_ADDED_SINCE = ('xla_auto_flags',)  # Top-level keys.


def test_an_old_saved_config_comes_back_in_the_current_layout(tmp_path):
  want = json.loads(tiny_config(tmp_path).to_json_best_effort())
  for section, keys in ADDED_SINCE.items():
    for key in keys:
      del want[section][key]
  for section in SECTIONS_ADDED_SINCE + KEYS_ADDED_SINCE:
    del want[section]
  old = dict(OLD_SAVED, data_dir=str(tmp_path))
  assert config_keys.upgrade(old) == want
  assert config_keys.upgrade(want) == want  # The current layout is kept.


def test_a_workdir_saved_with_old_keys_resumes_and_loads_in_the_tools(
    tiny_run, tmp_path, caplog):
  data_dir, workdir = tiny_run.data_dir, tmp_path / 'w'
  shutil.copytree(tiny_run.workdir, workdir)
  # Rewrite its checkpoints' meta as the flat layout wrote it.
  for step in ('4', '8'):
    meta_file = workdir / 'checkpoints' / step / 'meta' / 'metadata'
    meta = json.loads(meta_file.read_text())
    meta = {k: v for k, v in meta.items() if k in ('layout', 'digest')}
    meta.update(OLD_RESUME_KEYS, config=json.dumps(
        dict(OLD_SAVED, data_dir=str(data_dir))))
    meta_file.write_text(json.dumps(meta))

  trained = loading.load_workdir(str(workdir))
  assert (trained.image_size, trained.channels, trained.num_classes) == (16, 1, 10)
  assert loading.saved_config(str(workdir)).schedule.base_lr == 0.001
  # Another batch size is still another run.
  with pytest.raises(ConfigError, match='batch_size: checkpoint 32 vs config 16'):
    trainer.train_and_evaluate(tiny_config(data_dir, batch_size=16), str(workdir))
  # The same run, longer: resumes at step 8 (the identity matches).
  with caplog.at_level(logging.INFO, logger='absl'):
    final = trainer.train_and_evaluate(
        tiny_config(data_dir, total_steps=10, eval_every=10), str(workdir))
  assert any('at step 8' in r.getMessage() and 'Resumed' in r.getMessage()
             for r in caplog.records)
  assert workdir_reader.load_meta(str(workdir))['train.accum_steps'] == 1
  assert final['eval_test_count'] == 500
