"""ViT-B/16 fine-tuned from the released ImageNet-21k checkpoint on ImageNet at 384 px.

    python train.py --config=configs/vit_b16.py --workdir=$HOME/runs/vit_b16 \
        --config.pretrained_path=/path/to/imagenet21k/ViT-B_16.npz

Paper number (ViT paper Table 2 / official repo, not measured here): 84.53% top-1
after 20k steps of batch 512 with SGD lr 0.03 (B/32: 81.66%, L/16: 84.47%).
Needs ImageNet prepared for TFDS (`imagenet2012`, manual download). On a TPU v3-8
this is the official repo's reference setup; on smaller hosts raise
`--config.train.accum_steps` to keep the global batch at 512.
"""

from configs import vit_paper


def get_config():
  """configs/vit_paper.py:ViT-B_16,imagenet2012."""
  return vit_paper.get_config('ViT-B_16,imagenet2012')
