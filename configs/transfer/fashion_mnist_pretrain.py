"""Transfer demo, step 1: pre-train the quickstart ViT on Fashion-MNIST.

    python train.py --config=configs/transfer/fashion_mnist_pretrain.py \
        --workdir=runs/transfer/fashion_mnist_pretrain

The model and recipe are configs/quickstart.py's (imported, not copied, so the
two stay the same model), for a fixed budget of a few CPU minutes instead of the
quickstart's epochs. Step 2 fine-tunes the workdir this writes on 300 digits:
configs/transfer/digits_finetune.py.

Measured (2-core shared CPU, 1 device, 172 img/s): 7m10s wall, Fashion-MNIST
test top-1 67.8% after 500 steps of batch 128 (about one epoch). More steps make a
better backbone; the transfer gain below was measured with this one.
See README, "Fine-tuning".
"""

import ml_collections

from configs import quickstart

PRETRAIN_STEPS = 500


def get_config() -> ml_collections.ConfigDict:
  config = quickstart.get_config()  # Locked: only existing keys are changed.
  config.total_steps = PRETRAIN_STEPS
  config.lr.warmup_steps = min(config.lr.warmup_steps, PRETRAIN_STEPS // 5)
  config.eval_every = PRETRAIN_STEPS
  config.checkpoint_every = PRETRAIN_STEPS
  return config
