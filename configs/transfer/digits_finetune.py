"""Transfer demo, step 2: fine-tune the Fashion-MNIST ViT on 300 digits.

    python train.py --config=configs/transfer/digits_finetune.py \
        --workdir=runs/transfer/digits_finetune \
        --config.pretrained_path=runs/transfer/fashion_mnist_pretrain

`pretrained_path` is the workdir of configs/transfer/fashion_mnist_pretrain.py
(the default above) or any checkpoint `load_pretrained` reads. scikit-learn's
8x8 digits are upsampled to 32 px: with 4x4 patches the 7x7 patch grid of the
28 px pre-training becomes 8x8, so the position embedding is resized; the
10-class Fashion-MNIST head is replaced by a fresh (zero) one. Only the first
300 of the 1,297 training digits are used; all 500 test digits are evaluated.
configs/transfer/digits_scratch.py is the same run from a random init.

Expected (measured; 200 steps of batch 64 = 43 epochs of the 300 digits),
digits test top-1 over all 500 test images:
  fine-tuned from the 500-step pre-training: 91.2% (seed 0), 89.6% (seed 1)
  from scratch (digits_scratch.py):           76.4% (seed 0), 72.6% (seed 1)
docs/recipes.md, "What pre-training buys", has the times and the lr check of
the scratch baseline.
"""

import ml_collections

from configs import common
from configs.transfer import fashion_mnist_pretrain


def get_config() -> ml_collections.ConfigDict:
  config = common.get_config()
  config.dataset = 'digits'
  config.batch_size = 64
  config.total_steps = 200
  config.log_every = 20
  config.eval_every = 100
  config.checkpoint_every = 200
  config.pretrained_path = 'runs/transfer/fashion_mnist_pretrain'
  config.model = fashion_mnist_pretrain.model_section()  # The pre-trained one.
  config.input.train_split = 'train[:300]'
  config.input.image_size = 32
  config.input.channels = 1
  config.pp.train_crop = 'random'  # Resize to 37 px, random 32 px crop.
  config.pp.flip = False           # Mirrored digits are other symbols.
  config.optim.name = 'adamw'
  config.optim.weight_decay = 0.05
  config.schedule.base_lr = 1e-3
  config.schedule.warmup_steps = 20
  config.lock()
  return config
