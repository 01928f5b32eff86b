"""Shared recipe of the ViT paper's fine-tuning runs (Dosovitskiy et al., 2021, App. B.1.1).

SGD with momentum 0.9, no weight decay, global-norm clipping at 1, batch 512, linear
warmup for 500 steps then cosine decay, inception crop + flip for training, plain
resize for evaluation, head re-initialised to zeros, position embeddings resized to
the new resolution. `pretrained_path` points at a released i21k `.npz`; the
`gs://vit_models/...` default needs network access to GCS: copy the file and pass
`--config.pretrained_path=/local/ViT-B_16.npz` where it has none.
"""

import ml_collections

from configs import common
from vit_jax import models

# Released ImageNet-21k checkpoints (the original paper's files, with pre_logits).
I21K_CHECKPOINTS = 'gs://vit_models/imagenet21k/{name}.npz'


def get_config(model: str, dataset: str, *, steps: int, lr: float,
               image_size: int = 384, eval_splits: str = 'test',
               train_split: str = 'train') -> ml_collections.ConfigDict:
  """The paper's fine-tuning recipe for `model` on TFDS `dataset` (unlocked)."""
  config = common.get_config()
  config.model = models.model_section(model)
  config.pretrained_path = I21K_CHECKPOINTS.format(name=model)
  config.dataset = dataset
  config.train_split = train_split
  config.eval_splits = eval_splits
  config.image_size = image_size
  config.pp.train_crop = 'inception'
  config.pp.area_min = 0.05
  config.pp.flip = True

  config.batch_size = 512
  config.total_steps = steps
  config.optim.name = 'sgd'
  config.optim.momentum = 0.9
  config.lr.base = lr
  config.lr.warmup_steps = 500
  config.lr.schedule = 'cosine'
  config.grad_clip_norm = 1.0
  config.weight_decay = 0.0

  config.log_every = 50
  config.eval_every = 1000
  config.checkpoint_every = 1000
  return config
