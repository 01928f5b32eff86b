"""Quickstart: a small ViT on Fashion-MNIST that trains in minutes on a laptop CPU.

    python train.py --config=configs/quickstart.py --workdir=/tmp/quickstart

Works offline from Debian's `dataset-fashion-mnist` files. The model is a 4-block,
width-128 ViT with 7x7 patches on the 28x28 grayscale images (16 tokens + cls,
540k parameters): on a CPU the short sequence buys more than small patches do
(measured against 4x4 patches at widths 64-128: per epoch it learns as fast or
faster, at 1.5-4.5x the images per second). Training takes the images as they are
(plus a mirror): a random crop that zooms while evaluation does not cost 6-15
points at this budget. Measured result: see README ("Quickstart").
"""

import ml_collections

from configs import common
from vit_jax import models


def get_config() -> ml_collections.ConfigDict:
  config = common.get_config()
  config.model = models.model_section(
      'ViT-test_4', hidden_size=128, num_layers=4, num_heads=4, mlp_dim=256,
      patch_size=(7, 7))
  config.dataset = 'fashion_mnist'
  config.train_split = 'train'
  config.eval_splits = 'test'
  config.image_size = 28
  config.channels = 1
  config.pp.train_crop = 'resize'  # No crop (see above); 28 px stays 28 px.
  config.pp.flip = True

  config.batch_size = 128
  config.total_epochs = 5.0
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
