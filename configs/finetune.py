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
  # The defaults are this recipe (batch 512, SGD momentum 0.9 without weight
  # decay, clip 1, 500 warmup steps + cosine, inception crop + flip).
  config = common.get_config()
  config.dataset = dataset
  config.total_steps = steps
  config.pretrained_path = I21K_CHECKPOINTS.format(name=model)
  config.model = models.model_section(model)
  config.input.train_split = train_split
  config.input.image_size = image_size
  config.eval.splits = eval_splits
  config.schedule.base_lr = lr
  return config
