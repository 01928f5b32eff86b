"""DeiT-S from scratch on ImageNet-1k (Touvron et al. 2021), without distillation.

    python train.py --config=configs/deit_s.py --workdir=$HOME/runs/deit_s

Needs the TFDS `imagenet2012` dataset prepared locally. Trains on the full train
split and evaluates on validation, as DeiT does; the EMA of the parameters is
evaluated too (`eval_validation_ema_top1`).

Recipe (the DeiT paper's hyper-parameter table and its timm-based training
script): ViT-S/16 (class token, learned position embeddings); AdamW, lr 5e-4 x
batch / 512 = 1e-3 at batch 1024, weight decay 0.05, 300 epochs, 5 warmup
epochs then cosine down to 1e-5, no gradient clipping; label smoothing 0.1;
RandAugment 'rand-m9-mstd0.5-inc1'; mixup alpha 0.8, cutmix alpha 1.0, switch
probability 0.5, applied to every batch; random erasing 0.25; stochastic depth
0.1; no dropout; EMA of the weights with decay 0.99996; train crop
RandomResizedCrop scale (0.08, 1) + flip, evaluation resize 256 / central crop
224.

Mapping onto this project:
  * weight decay: torch's AdamW multiplies it by the lr, as `weight_decay` does
    here, so 0.05 is 0.05. timm exempts biases, norm parameters, cls and the
    position embedding; the default `wd_mask` ('.*/kernel$') decays exactly the
    kernels, which is the same set.
  * RandAugment: timm's 'rand-m9-mstd0.5-inc1' is 2 layers at magnitude 9 on a
    scale where 10 is each op's maximum, with the 'increasing' op variants --
    the same scale as vit_jax/data/augment.py with randaugment_rule=
    'increasing', so randaugment_layers=2, randaugment_magnitude=9 (timm's
    increasing Posterize keeps 4 - 4m/10 bits, ours 8 - 4m/10). Not reproduced: mstd0.5
    (timm draws each op's magnitude from N(9, 0.5)), timm's per-op application
    probability 0.5 (ours applies every chosen op), and timm's op set differs
    slightly from the TF one used here.
  * warmup: 5 epochs of ImageNet's 1,281,167 train images at batch 1024 =
    6,256 steps.
  * Not reproduced: repeated augmentation (3 repeats per batch) and timm's
    warmup from lr 1e-6 (ours warms up from 0).

Paper number (not measured here): DeiT-S 79.8% ImageNet top-1 (224 px).
"""

import ml_collections

from configs import common
from vit_jax import models

IMAGENET_TRAIN_IMAGES = 1_281_167
BATCH_SIZE = 1024
PAPER_TOP1 = 79.8  # DeiT-S, ImageNet top-1 (%), paper number.


def get_config() -> ml_collections.ConfigDict:
  """The locked DeiT-S config."""
  # The defaults already are 224 px, the train split, a flip, Adam's betas
  # and eps (0.9, 0.999, 1e-8), a cosine decay, and mixup's probabilities
  # (every batch; cutmix or mixup with probability 0.5 each).
  config = common.get_config()
  config.dataset = 'imagenet2012'
  config.batch_size = BATCH_SIZE
  config.total_epochs = 300.0
  config.eval_every = 2500
  config.model = models.model_section('ViT-S_16', stochastic_depth=0.1)
  config.input.shuffle_buffer = 250_000
  config.input.cache = False
  config.pp.area_min = 0.08
  config.pp.randaugment_layers = 2
  config.pp.randaugment_magnitude = 9.0
  config.pp.randaugment_rule = 'increasing'
  config.pp.random_erase_prob = 0.25
  config.pp.eval_crop_fraction = 224 / 256
  config.mixup.mixup_alpha = 0.8
  config.mixup.cutmix_alpha = 1.0
  config.eval.splits = 'validation'
  config.optim.name = 'adamw'
  config.optim.weight_decay = 0.05
  config.optim.grad_clip_norm = 0.0
  config.schedule.base_lr = 5e-4 * BATCH_SIZE / 512
  config.schedule.warmup_steps = round(5 * IMAGENET_TRAIN_IMAGES / BATCH_SIZE)
  config.schedule.end_lr = 1e-5
  config.train.label_smoothing = 0.1
  config.train.ema_decay = 0.99996
  config.lock()
  return config
