"""Shared defaults for every training config.

Each experiment config starts from `get_config()` here, overrides what its recipe
needs, and returns a locked ConfigDict: an unknown key (a typo such as
`--config.batchsize=64`) is an error, not a silently ignored setting.

Durations: set `total_steps`, or `total_epochs` (then total_steps is derived from the
train split size and the batch size). When both are set, `total_steps` wins, so
`--config.total_steps=100` shortens an epoch-based config from the command line.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the defaults every training config shares."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Model: `model.name` picks a registered variant (vit_jax.models); every other key
  # under `model` overrides a field of that variant (e.g. dropout_rate, classifier).
  config.model = ml_collections.ConfigDict()
  config.model.name = 'ViT-Ti_16'
  # Fine-tuning start (vit_jax.checkpoint.load_pretrained): a released / Linen /
  # big_vision .npz, or a workdir of ours (its checkpoints/, or checkpoints/<step>).
  # The head is always re-initialised for the new classes.
  config.pretrained_path = ''      # '' = train from scratch.
  config.pretrained_keep_pre_logits = ml_collections.FieldReference(None, field_type=bool)
  #                                  None: keep the file's pre_logits if the model has
  #                                  that layer; True: require it; False: fresh.
  config.pretrained_posemb_resize = 'linear'  # 'linear' (reference) | 'bicubic' (timm)

  # Data. `dataset` is a TFDS name ('cifar10', 'fashion_mnist', 'digits') or
  # 'folder:/path/to/root' for an image folder (root/<split>/<class>/*.jpg).
  config.dataset = 'fashion_mnist'
  config.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.train_split = 'train'
  config.eval_splits = 'test'      # Comma-separated list; each is evaluated in full.
  config.image_size = 224          # Model input resolution (square).
  config.channels = 3              # Grayscale data is repeated to 3 channels unless 1.
  config.shuffle_buffer = 50_000
  config.cache = True              # Cache decoded examples in memory (small datasets).
  config.prefetch = 2
  config.skip_bad_images = False   # Image folders: skip unreadable files (warn), not fail.
  config.tfds_reader = 'shards'    # 'shards' | 'as_dataset' (any TFDS format, mock_data).
  config.pp = ml_collections.ConfigDict()
  config.pp.train_crop = 'inception'   # 'inception' | 'random' | 'resize' | 'pad'
  config.pp.crop_padding = 4           # train_crop='pad': border in pixels.
  config.pp.area_min = 0.05            # Inception crop: smallest area fraction.
  config.pp.flip = True
  config.pp.eval_crop_fraction = 1.0   # < 1: resize to size/fraction, central crop.
  # Train-only augmentation (vit_jax/data/augment.py), after crop and flip.
  config.pp.randaugment_layers = 0     # Ops per image; 0 = off (AugReg: 2).
  config.pp.randaugment_magnitude = 10.0  # [0, 30]; 10 = each op's reference max.
  # Magnitude -> op argument (vit_jax/data/augment_rules.py): 'reference' =
  # TF official / big_vision, what AugReg and plain-ViT numbers used;
  # 'increasing' = every op grows with magnitude, 0 = identity (timm '-inc1').
  config.pp.randaugment_rule = 'reference'
  config.pp.random_erase_prob = 0.0    # DeiT: 0.25; one noise box, in [-1, 1] units.

  # Optimisation.
  config.batch_size = 512          # Global batch, across all devices and hosts.
  config.accum_steps = 1           # Micro-batches per step (gradient accumulation).
  config.total_steps = ml_collections.FieldReference(None, field_type=int)
  config.total_epochs = ml_collections.FieldReference(None, field_type=float)
  config.optim = ml_collections.ConfigDict()
  config.optim.name = 'sgd'        # 'sgd' | 'adam' | 'adamw'
  config.optim.momentum = 0.9      # sgd
  config.optim.nesterov = False    # sgd
  config.optim.accumulator_dtype = 'float32'  # sgd momentum / Adam mu dtype ('bfloat16' saves memory)
  config.optim.b1 = 0.9            # adam/adamw
  config.optim.b2 = 0.999          # adam/adamw
  config.optim.eps = 1e-8          # adam/adamw
  config.lr = ml_collections.ConfigDict()
  config.lr.base = 0.03
  config.lr.schedule = 'cosine'    # 'cosine' | 'linear' | 'rsqrt' | 'constant'
  config.lr.warmup_steps = 500
  config.lr.end_value = 0.0        # Value the decay ends at (cosine/linear).
  config.lr.timescale = 10_000     # rsqrt with warmup_steps=0: lr = base*sqrt(t/(step+t)).
  config.grad_clip_norm = 1.0      # Global-norm clipping; 0 disables.
  config.weight_decay = 0.0        # Decoupled; multiplied by the learning rate.
  config.wd_mask = '.*/kernel$'    # Regex over '/'-joined param paths that decay.
  # Parameter rules (vit_jax.param_rules): regexes over '/'-joined param paths.
  config.frozen = ''               # Matching params get no updates ('' = none).
  config.lr_mults = ()             # ((regex, factor), ...): first match scales its lr.
  config.layer_decay = 1.0         # lr x decay**(top - depth); 1 disables (BEiT style).
  config.label_smoothing = 0.0
  # Mixup / cutmix of each batch on device (vit_jax.mixup); targets become soft.
  config.mixup = ml_collections.ConfigDict()
  config.mixup.mixup_alpha = 0.0   # Beta(a, a) blending weight; 0 = no mixup.
  config.mixup.cutmix_alpha = 0.0  # Beta(a, a) pasted-box area; 0 = no cutmix.
  config.mixup.prob = 1.0          # Chance that a batch is mixed at all.
  config.mixup.switch_prob = 0.5   # Chance of cutmix (not mixup) when both are on.
  # EMA of the params, updated every step and evaluated beside them
  # (eval_<split>_ema_*); load with checkpoint.load_params(..., ema=True). 0 = off.
  config.ema_decay = 0.0

  # Parallelism.
  config.parallelism = 'jit'       # 'jit' (sharded jit) | 'shard_map' (explicit pmean)
  # CPU hosts only: split the cores into this many XLA devices that run the step
  # data-parallel (parallel.use_cpu_devices; applied by train.py at start-up).
  # Pays for small models; 0 = JAX's default (one device, or XLA_FLAGS).
  config.cpu_devices = 0
  # Mesh and sharding rules (vit_jax.sharding, docs/launch.md). Batches are split
  # over `data`; `model` is the tensor-parallel group size (within one host).
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1            # -1: all devices not taken by `model`.
  config.mesh.model = 1
  # A preset ('replicate' | 'fsdp' | 'model' | 'fsdp+model', applied to every
  # param) or ((regex, strategy), ...) over '/'-joined param paths, first match
  # wins, unmatched params replicated. 'fsdp' and 'model' need parallelism='jit'.
  config.sharding = ml_collections.FieldReference('replicate', field_type=object)
  config.fsdp_min_size = 2**18     # fsdp leaves smaller arrays (elements) replicated.

  # Loop, evaluation, logging, checkpoints.
  config.log_every = 50
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3      # >= 2 lets a resume fall back past a damaged latest one.
  # A step whose loss or gradient norm is NaN/Inf: 'stop' ends the run (exit
  # non-zero, naming the step; nothing after it is saved) | 'skip_step' leaves
  # params and optimizer state unchanged for that step and counts it
  # (`skipped_steps` in metrics.jsonl).
  config.nan_policy = 'stop'
  config.eval_batch_size = 256
  config.peak_flops = ml_collections.FieldReference(None, field_type=float)  # per device; None = auto
  config.write_plot = True
  return config
