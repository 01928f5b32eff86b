"""CIFAR-10 / CIFAR-100 fine-tuning from ImageNet-21k, as in the ViT paper.

    python train.py --config=configs/cifar.py:ViT-B_16,cifar10 --workdir=...

Argument: `<model>,<dataset>` with model one of ViT-Ti_16, ViT-S_16, ViT-B_16,
ViT-B_32, ViT-L_16 and dataset cifar10 or cifar100. 10k steps at batch 512, 384 px,
SGD lr 0.01 (the official repo's CIFAR setting). `pretrained_path` defaults to the
model's released i21k file (gs://vit_models/imagenet21k/; override with a local
copy). The Ti/S files are the AugReg ones: pass them via --config.pretrained_path.

Paper numbers (not measured here; ViT paper replication, i21k -> 384 px):
  ViT-B/16: CIFAR-10 99.02%, CIFAR-100 92.06%.
Other models: see the ViT paper (Table 2, App. D) and the AugReg paper; no number is
quoted here that this project has not checked against its source.
"""

from configs import vit_paper

MODELS = vit_paper.MODELS
DATASETS = ('cifar10', 'cifar100')


def get_config(arg: str = 'ViT-B_16,cifar10'):
  """`<model>,<cifar10|cifar100>`: configs/vit_paper.py's CIFAR rows."""
  model, _, dataset = (s.strip() for s in arg.partition(','))
  if model not in MODELS or dataset not in DATASETS:
    raise ValueError(f'configs/cifar.py:<model>,<dataset> with model in {MODELS} '
                     f'and dataset in {DATASETS}; got {arg!r}')
  return vit_paper.get_config(f'{model},{dataset}')
