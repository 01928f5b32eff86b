"""Fashion-MNIST with 49 patch tokens: the model the compression numbers use.

    python train.py --config=configs/compression.py --workdir=runs/compression

The quickstart's 3x3-conv stem leaves only 16 tokens, too few for token
merging to show its effect; this is a plain ViT on 4x4 patches at 28 px, so
its encoder sees a 7x7 grid of 49 tokens plus the cls token, with 4 heads per
block (so that pruning 25% of heads removes one per block) and widths that
2:4 sparsity divides. 4 blocks, width 64, MLP 128: 139k parameters. AdamW
3e-3, batch 128, 10 epochs, mirror only, data-parallel over two CPU devices.

Fine-tuning from it (quantization-aware training, pruning) starts from its
workdir with `--config.pretrained_path=runs/compression`, a constant small
learning rate and a short run: see docs/compression.md for every command and
the measured results.
"""

import ml_collections

from configs import common
from vit_jax import models


def get_config() -> ml_collections.ConfigDict:
  config = common.get_config()  # Its dataset is Fashion-MNIST.
  config.batch_size = 128
  config.total_epochs = 10.0
  config.log_every = 100
  config.eval_every = 4690
  config.model = models.model_section(
      'ViT-test_4', hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128,
      patch_size=(4, 4))
  config.input.image_size = 28
  config.input.channels = 1
  config.pp.train_crop = 'resize'  # No crop: 28 px stays 28 px.
  config.eval.batch_size = 1000
  config.optim.name = 'adamw'
  config.optim.weight_decay = 0.05
  config.schedule.base_lr = 3e-3
  config.schedule.warmup_steps = 200
  config.mesh.cpu_devices = 2
  config.lock()
  return config
