"""Quickstart: a small ViT on Fashion-MNIST that trains in minutes on a laptop CPU.

    python train.py --config=configs/quickstart.py --workdir=/tmp/quickstart

Works offline from Debian's `dataset-fashion-mnist` files. The model is a 6-layer,
width-128 ViT with 4x4 patches on the 28x28 grayscale images (49 tokens + cls).
Measured result: see README ("Quickstart").
"""

import ml_collections

from configs import common
from vit_jax import models


def get_config() -> ml_collections.ConfigDict:
  config = common.get_config()
  config.model = models.model_section(
      'ViT-test_4', hidden_size=128, num_layers=6, num_heads=4, mlp_dim=256)
  config.dataset = 'fashion_mnist'
  config.train_split = 'train'
  config.eval_splits = 'test'
  config.image_size = 28
  config.channels = 1
  config.pp.train_crop = 'random'
  config.pp.flip = True

  config.batch_size = 128
  config.total_epochs = 4.0
  config.optim.name = 'adamw'
  config.optim.b2 = 0.999
  config.lr.base = 2e-3
  config.lr.warmup_steps = 200
  config.lr.schedule = 'cosine'
  config.weight_decay = 0.05
  config.grad_clip_norm = 1.0
  config.label_smoothing = 0.0

  config.log_every = 100
  config.eval_every = 1000
  config.checkpoint_every = 500
  config.eval_batch_size = 1000
  config.lock()
  return config
