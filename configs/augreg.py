"""AugReg pre-training ("How to train your ViT?", Steiner et al. 2021).

    python train.py --config=configs/augreg.py:variant=B/16,aug=medium1 \\
        --workdir=$HOME/runs/augreg_b16

Argument: comma-separated `key=value`, every key optional:
  variant  Ti/16 S/16 B/16 L/16 S/32 B/32 L/32           (default B/16)
  aug      none light1 light2 medium1 medium2 strong1 strong2  (default medium1)
  wd       0.1 or 0.03, the released files' `wd_` value   (default 0.1)
  do, sd   dropout and stochastic depth, 0.0 or 0.1       (default 0.0 each)
  data     i21k (ImageNet-21k, 300 epochs) or i1k (ImageNet-1k, 300 epochs)
A released checkpoint's name spells its setting, e.g.
`B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0` is
`variant=B/16,aug=medium1,wd=0.1,do=0.0,sd=0.0` (configs/augreg_finetune.py
fine-tunes those files).

Augmentation levels -> (RandAugment layers, magnitude, mixup alpha), verified
against big_vision's configs/vit_i21k.py (RANDAUG_DEF / MIXUP_DEF):
  none (0, -, 0), light1 (2, 0, 0), light2 (2, 10, 0.2), medium1 (2, 15, 0.2),
  medium2 (2, 15, 0.5), strong1 (2, 20, 0.5), strong2 (2, 20, 0.8).
Magnitudes are on the TF/big_vision scale with its magnitude rules
(`pp.randaugment_rule='reference'`, vit_jax/data/augment_rules.py: 10 = each
op's reference maximum, 15 and 20 extrapolate). Under those rules light1's
magnitude 0 is not a no-op: Posterize keeps 1 bit, Solarize inverts every
pixel and the enhance ops use factor 0.1, as in the runs behind the numbers.

Recipe (same source): batch 4096, Adam b2 0.999 (first moment in bfloat16),
lr 1e-3, 10k warmup steps then cosine, global-norm clip 1.0, inception crop +
flip, 300 epochs, evaluation at resize 256 / central crop 224. Weight decay:
the files' `wd_0.1` is big_vision's wd 1e-4 at lr 1e-3 (its config.wd = 0.0001
with lr 0.001), i.e. the decay is lr-scaled, which is exactly this project's
`weight_decay` (vit_jax/optim.py): weight_decay = wd.

Not verified here (said so rather than guessed): the paper's exact pairing of
dropout/stochastic-depth levels with model sizes (we take `do`/`sd` as given in
the file names), and the i1k runs' splits (we use train[:99%] and evaluate on
train[99%:] and validation, as big_vision's i1k configs do). Differences from
the paper: i21k was trained with a sigmoid cross-entropy loss (and head bias
initialised to -10); this trainer has softmax cross-entropy only. ImageNet-21k
is not a TFDS builder: register your own as `imagenet21k` (splits `train` and
`validation`), or pass `--config.dataset=folder:/path` and the split names.

Paper numbers (not measured here; these i21k checkpoints fine-tuned on
ImageNet at 384 px, see configs/augreg_finetune.py): Ti/16 78.22%, S/16 83.73%,
B/16 85.49%, L/16 85.59%.
"""

import dataclasses

import ml_collections

from configs import common
from vit_jax import models


@dataclasses.dataclass(frozen=True)
class Aug:
  randaugment_layers: int
  randaugment_magnitude: float
  mixup_alpha: float


AUG_LEVELS = {
    'none': Aug(0, 10.0, 0.0),  # RandAugment off (its magnitude is unused).
    'light1': Aug(2, 0.0, 0.0),
    'light2': Aug(2, 10.0, 0.2),
    'medium1': Aug(2, 15.0, 0.2),
    'medium2': Aug(2, 15.0, 0.5),
    'strong1': Aug(2, 20.0, 0.5),
    'strong2': Aug(2, 20.0, 0.8),
}
VARIANTS = ('Ti/16', 'S/16', 'B/16', 'L/16', 'S/32', 'B/32', 'L/32')
DATA = {  # name -> (TFDS dataset, train split, eval splits)
    'i21k': ('imagenet21k', 'train', 'validation'),
    'i1k': ('imagenet2012', 'train[:99%]', 'train[99%:],validation'),
}
DEFAULTS = dict(variant='B/16', aug='medium1', wd='0.1', do='0.0', sd='0.0',
                data='i21k')
# Paper numbers (ImageNet top-1 % at 384 px after fine-tuning the i21k files).
PAPER_TOP1 = {'Ti/16': 78.22, 'S/16': 83.73, 'B/16': 85.49, 'L/16': 85.59}


def parse_arg(arg: str) -> dict[str, str]:
  """'variant=B/16,aug=medium1' -> DEFAULTS updated; unknown keys are errors."""
  values = dict(DEFAULTS)
  for item in filter(None, (s.strip() for s in (arg or '').split(','))):
    key, eq, value = item.partition('=')
    if not eq or key not in DEFAULTS:
      raise ValueError(f'configs/augreg.py: expected key=value with key in '
                       f'{sorted(DEFAULTS)}; got {item!r}')
    values[key] = value
  return values


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """The locked config of one AugReg pre-training setting."""
  a = parse_arg(arg)
  choices = {'variant': VARIANTS, 'aug': tuple(AUG_LEVELS), 'wd': ('0.1', '0.03'),
             'do': ('0.0', '0.1'), 'sd': ('0.0', '0.1'), 'data': tuple(DATA)}
  for key, allowed in choices.items():
    if a[key] not in allowed:
      raise ValueError(f'configs/augreg.py: {key} in {allowed}; got {a[key]!r}')
  aug = AUG_LEVELS[a['aug']]
  dataset, train_split, eval_splits = DATA[a['data']]

  # The defaults already are 224 px, inception crop (area >= 5%) + flip,
  # Adam's betas (0.9, 0.999), cosine to 0, clip 1, no label smoothing.
  config = common.get_config()
  config.dataset = dataset
  config.batch_size = 4096
  config.total_epochs = 300.0
  config.eval_every = 5000
  size, patch = a['variant'].split('/')
  config.model = models.model_section(
      f'ViT-{size}_{patch}', dropout_rate=float(a['do']),
      stochastic_depth=float(a['sd']))
  config.input.train_split = train_split
  config.input.shuffle_buffer = 250_000
  config.input.cache = False
  config.pp.randaugment_layers = aug.randaugment_layers
  config.pp.randaugment_magnitude = aug.randaugment_magnitude
  config.pp.eval_crop_fraction = 224 / 256
  config.mixup.mixup_alpha = aug.mixup_alpha
  config.eval.splits = eval_splits
  config.optim.name = 'adamw'
  config.optim.accumulator_dtype = 'bfloat16'
  config.optim.weight_decay = float(a['wd'])  # lr-scaled, as the file names mean it.
  config.schedule.base_lr = 1e-3
  config.schedule.warmup_steps = 10_000
  config.lock()
  return config
