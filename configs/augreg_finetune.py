"""ImageNet fine-tuning at 384 px from the AugReg ImageNet-21k checkpoints.

    python train.py --config=configs/augreg_finetune.py:B_16 \\
        --workdir=$HOME/runs/augreg_b16 --config.pretrained_path=/data/augreg_b16.npz

(/data/augreg_b16.npz: a local copy of the B_16 file below; without the flag the
file is read from GCS.)

Argument: the variant, Ti_16, S_16, B_16 or L_16. The start is the checkpoint the
vision_transformer repository recommends for that variant ("How to train your
ViT?", Steiner et al., 2021), under gs://vit_models/augreg/ (needs network access
to GCS; copy it and pass --config.pretrained_path where there is none):

  Ti_16  Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz
  S_16   S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz
  B_16   B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz
  L_16   L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0.npz

These files have no `pre_logits` layer; the ImageNet head is new. Recipe: the ViT
paper's fine-tuning (configs/finetune.py: SGD momentum 0.9, batch 512, clip 1,
500 warmup + cosine, inception crop + flip, 384 px) for 20k steps, with the
learning rate in the name of the released fine-tuned file the repository pairs
with each number (`...--imagenet2012-steps_20k-lr_<lr>-res_384.npz`).

Paper numbers (not measured here; ImageNet top-1 at 384 px as reported for
these checkpoints): Ti/16 78.22%, S/16 83.73%, B/16 85.49%, L/16 85.59%.
"""

import dataclasses

import ml_collections

from configs import finetune

AUGREG_DIR = 'gs://vit_models/augreg/'


@dataclasses.dataclass(frozen=True)
class Variant:
  model: str
  checkpoint: str   # File name under AUGREG_DIR.
  lr: float
  paper_top1: float  # ImageNet top-1 (%), paper number.


VARIANTS = {
    'Ti_16': Variant('ViT-Ti_16', 'Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-'
                     'do_0.0-sd_0.0.npz', 0.03, 78.22),
    'S_16': Variant('ViT-S_16', 'S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-'
                    'do_0.0-sd_0.0.npz', 0.03, 83.73),
    'B_16': Variant('ViT-B_16', 'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-'
                    'do_0.0-sd_0.0.npz', 0.03, 85.49),
    'L_16': Variant('ViT-L_16', 'L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-'
                    'do_0.0-sd_0.0.npz', 0.01, 85.59),
}


def get_config(arg: str = 'B_16') -> ml_collections.ConfigDict:
  """The locked config of one AugReg variant."""
  variant = VARIANTS.get(arg.strip())
  if variant is None:
    raise ValueError(f'configs/augreg_finetune.py:<variant> with variant in '
                     f'{sorted(VARIANTS)}; got {arg!r}')
  config = finetune.get_config(
      variant.model, 'imagenet2012', steps=20_000, lr=variant.lr,
      image_size=384, train_split='train[:99%]', eval_splits='validation')
  config.pretrained_path = AUGREG_DIR + variant.checkpoint
  config.lock()
  return config
