"""Transfer demo, step 1: pre-train a small ViT on Fashion-MNIST.

    python train.py --config=configs/transfer/fashion_mnist_pretrain.py \
        --workdir=runs/transfer/fashion_mnist_pretrain

A 6-block, width-128 ViT with 4x4 patches (805k parameters), trained for a
fixed budget of a few CPU minutes. The model and recipe are pinned here (they
were the quickstart's when the numbers below were measured), so retuning
configs/quickstart.py does not move them. Step 2 fine-tunes the workdir this
writes on 300 digits: configs/transfer/digits_finetune.py.

Expected (measured): Fashion-MNIST test top-1 67.8% after 500 steps of batch
128 (about one epoch; the random crop zooms by 8/7 while evaluation does not,
which costs accuracy at this budget). More steps make a better backbone; the
transfer gain was measured with this one. docs/recipes.md, "What pre-training buys".
"""

import ml_collections

from configs import common
from vit_jax import models

PRETRAIN_STEPS = 500


def model_section() -> ml_collections.ConfigDict:
  """The pre-trained architecture (digits_finetune.py must build the same)."""
  return models.model_section(
      'ViT-test_4', hidden_size=128, num_layers=6, num_heads=4, mlp_dim=256)


def get_config() -> ml_collections.ConfigDict:
  config = common.get_config()  # Its dataset is Fashion-MNIST.
  config.batch_size = 128
  config.total_steps = PRETRAIN_STEPS
  config.log_every = 100
  config.eval_every = PRETRAIN_STEPS
  config.checkpoint_every = PRETRAIN_STEPS
  config.model = model_section()
  config.input.image_size = 28
  config.input.channels = 1
  config.pp.train_crop = 'random'
  config.eval.batch_size = 1000
  config.optim.name = 'adamw'
  config.optim.weight_decay = 0.05
  config.schedule.base_lr = 2e-3
  config.schedule.warmup_steps = PRETRAIN_STEPS // 5
  config.lock()
  return config
