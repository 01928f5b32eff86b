"""GFNet from scratch on ImageNet-1k (Rao et al., NeurIPS 2021), isotropic variants.

    python train.py --config=configs/gfnet.py:Ti --workdir=$HOME/runs/gfnet_ti

Argument: the variant, one of Ti XS S B (default Ti): the registered models
`GFNet-Ti` ... `GFNet-B` (vit_jax/models/fourier.py; parameter counts equal the
official code's).

Recipe (the paper's Section 4.1 and the official main_gfnet.py, which is DeiT's
training script): the DeiT-S recipe of configs/deit_s.py -- AdamW, lr 5e-4 x
batch / 512 = 1e-3 at batch 1024, weight decay 0.05, 300 epochs, 5 warmup
epochs then cosine to 1e-5, label smoothing 0.1, RandAugment
rand-m9-mstd0.5-inc1, mixup 0.8 / cutmix 1.0, 224 px crops -- with these
differences, all from main_gfnet.py's defaults:
  * gradient clipping at global norm 1.0 (`--clip-grad 1`);
  * no random erasing (`--reprob 0`);
  * no EMA of the weights (`--model-ema` off);
  * stochastic depth per variant, built into the model (0, 0, 0.15, 0.25 at
    the last block, linear from 0; the script's --drop-path flag is unused).
Differences from the official code that this project does not reproduce:
timm's warmup from lr 1e-6 (ours starts at 0) and its truncated-normal init
(ours: the ViT's initialisers, see docs/models.md).

Paper numbers (not measured here): ImageNet top-1 at 224 px, Ti 74.6%,
XS 78.6%, S 80.0%, B 80.7%.
"""

import ml_collections

from configs import deit_s
from vit_jax import models

VARIANTS = ('Ti', 'XS', 'S', 'B')
PAPER_TOP1 = {'Ti': 74.6, 'XS': 78.6, 'S': 80.0, 'B': 80.7}  # Paper numbers (%).


def get_config(variant: str = 'Ti') -> ml_collections.ConfigDict:
  """The locked GFNet config of `variant`."""
  if variant not in VARIANTS:
    raise ValueError(f'configs/gfnet.py:{variant}: the variant is one of {VARIANTS}')
  config = deit_s.get_config()
  config.model = models.model_section(f'GFNet-{variant}')
  config.optim.grad_clip_norm = 1.0
  config.pp.random_erase_prob = 0.0
  config.train.ema_decay = 0.0
  return config
