"""Shared defaults for every training config.

Each experiment config starts from `get_config()` here, sets only what its
recipe changes, and returns a locked ConfigDict: an unknown key (a typo such as
`--config.batchsize=64`) is an error, not a silently ignored setting.

Layout: the run-level keys every config has are top-level (`dataset`,
`batch_size`, `total_steps` / `total_epochs`, `log_every`, `eval_every`,
`checkpoint_every`, `seed`, `pretrained_path`, `xla_auto_flags`); everything
else sits in a section named for the code that reads it (`optim` for
vit_jax/optim.py, `input` and `pp` for vit_jax/data, ...). docs/configs.md lists every key;
keys of the earlier flat layout are refused with their new name
(vit_jax/config_keys.py).

Durations: set `total_steps`, or `total_epochs` (then total_steps is derived from the
train split size and the batch size). When both are set, `total_steps` wins, so
`--config.total_steps=100` shortens an epoch-based config from the command line.
"""

import ml_collections

FieldReference = ml_collections.FieldReference


def get_config() -> ml_collections.ConfigDict:
  """Returns the defaults every training config shares."""
  config = ml_collections.ConfigDict()

  # ------------------------------------------------------------ the run
  config.seed = 0
  # A TFDS name ('cifar10', 'fashion_mnist', 'digits') or 'folder:/path/to/root'
  # for an image folder (root/<split>/<class>/*.jpg).
  config.dataset = 'fashion_mnist'
  config.batch_size = 512          # Global batch, across all devices and hosts.
  config.total_steps = FieldReference(None, field_type=int)
  config.total_epochs = FieldReference(None, field_type=float)
  config.log_every = 50
  config.eval_every = 1000
  config.checkpoint_every = 1000
  # Fine-tuning start (vit_jax.checkpoint.load_pretrained): a released / Linen /
  # big_vision .npz, or a workdir of ours (its checkpoints/, or checkpoints/<step>).
  # The head is re-initialised for the new classes unless pretrained.keep_head.
  # '' = from scratch.
  config.pretrained_path = ''

  # ------------------------------------------------------------ model
  # `model.name` picks a registered variant (vit_jax.models); every other key
  # under `model` overrides a field of that variant (e.g. dropout_rate, classifier).
  config.model = ml_collections.ConfigDict()
  config.model.name = 'ViT-Ti_16'

  # How `pretrained_path` is loaded (vit_jax/checkpoint/pretrained.py).
  config.pretrained = ml_collections.ConfigDict()
  # None: keep the file's pre_logits if the model has that layer; True: require
  # it; False: a fresh one.
  config.pretrained.keep_pre_logits = FieldReference(None, field_type=bool)
  # True: keep the file's classifier too (fine-tuning on its own classes, as
  # QAT and pruning do); the file's head must have the model's shape.
  config.pretrained.keep_head = False
  config.pretrained.posemb_resize = 'linear'  # 'linear' (reference) | 'bicubic' (timm)
  # GFNet filters of another patch grid: 'bicubic' (official) | 'none' (refuse).
  config.pretrained.filter_resize = 'bicubic'
  # A patch embedding of another patch size (a /16 file, a /8 model): 'pi'
  # (FlexiViT's pseudo-inverse resize: same tokens) | 'bilinear' | 'none' (refuse).
  config.pretrained.patch_resize = 'pi'

  # ------------------------------------------------------------ input (data/)
  config.input = ml_collections.ConfigDict()
  config.input.data_dir = FieldReference(None, field_type=str)
  config.input.train_split = 'train'
  config.input.image_size = 224    # Model input resolution (square).
  config.input.channels = 3        # Grayscale data is repeated to 3 channels unless 1.
  config.input.shuffle_buffer = 50_000
  config.input.cache = True        # Cache decoded examples in memory (small datasets).
  config.input.prefetch = 2
  config.input.skip_bad_images = False  # Image folders: skip unreadable files (warn).
  # Image folders: refuse (or, skipping bad images, skip) an image whose header
  # claims more pixels than this, before decoding it (decompression bombs).
  config.input.max_image_pixels = 64_000_000
  # 'shards' | 'as_dataset' (any TFDS format; what tfds.testing.mock_data needs).
  config.input.tfds_reader = 'shards'
  # Preprocessing (vit_jax/data/preprocess.py).
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

  # ------------------------------------------------------------ evaluation
  config.eval = ml_collections.ConfigDict()
  config.eval.splits = 'test'      # Comma-separated list; each is evaluated in full.
  config.eval.batch_size = 256

  # ------------------------------------------------------------ few-shot (fewshot.py)
  # Ridge-regression probes of the pre-logit features during training, logged
  # as fewshot_<dataset>_<shots>shot (big_vision's few-shot evaluator).
  config.fewshot = ml_collections.ConfigDict()
  config.fewshot.datasets = ''     # Comma-separated dataset names (as `dataset`); '' = off.
  config.fewshot.train_split = 'train'  # Where the shots are drawn from (all of it
  config.fewshot.test_split = 'test'    # is embedded each time: slice big ones).
  config.fewshot.shots = (1, 5, 10, 25)  # Examples per class.
  config.fewshot.seeds = 3         # Draws of the shots per count; the mean is logged.
  config.fewshot.l2_reg = 2.0**10  # Ridge penalty on standardised features.
  config.fewshot.every = FieldReference(None, field_type=int)  # Steps; None = eval_every.

  # ------------------------------------------------------------ optimizer (optim.py)
  config.optim = ml_collections.ConfigDict()
  config.optim.name = 'sgd'        # 'sgd' | 'adam' | 'adamw'
  config.optim.momentum = 0.9      # sgd
  config.optim.nesterov = False    # sgd
  # Dtype of sgd's momentum / Adam's first moment ('bfloat16' saves memory).
  config.optim.accumulator_dtype = 'float32'
  config.optim.b1 = 0.9            # adam/adamw
  config.optim.b2 = 0.999          # adam/adamw
  config.optim.eps = 1e-8          # adam/adamw
  config.optim.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables.
  config.optim.weight_decay = 0.0  # Decoupled; multiplied by the learning rate.
  # Parameter rules (vit_jax.param_rules): regexes over '/'-joined param paths.
  config.optim.wd_mask = '.*/kernel$'  # Params that decay.
  config.optim.frozen = ''         # Matching params get no updates ('' = none).
  config.optim.lr_mults = ()       # ((regex, factor), ...): first match scales its lr.
  config.optim.layer_decay = 1.0   # lr x decay**(top - depth); 1 disables (BEiT style).
  # Learning-rate schedule (optim.make_schedule): linear warmup from 0, then `name`.
  config.schedule = ml_collections.ConfigDict()
  config.schedule.name = 'cosine'  # 'cosine' | 'linear' | 'rsqrt' | 'constant'
  config.schedule.base_lr = 0.03
  config.schedule.warmup_steps = 500
  config.schedule.end_lr = 0.0     # Where the decay ends (cosine/linear).
  config.schedule.timescale = 10_000  # rsqrt without warmup: base*sqrt(t/(step+t)).

  # ------------------------------------------------------------ train step (steps.py)
  config.train = ml_collections.ConfigDict()
  config.train.accum_steps = 1     # Micro-batches per step (gradient accumulation).
  config.train.label_smoothing = 0.0
  # EMA of the params, updated every step and evaluated beside them
  # (eval_<split>_ema_*); load with checkpoint.load_params(..., ema=True). 0 = off.
  config.train.ema_decay = 0.0
  # A step whose loss or gradient norm is NaN/Inf: 'stop' ends the run (exit
  # non-zero, naming the step; nothing after it is saved) | 'skip_step' leaves
  # params and optimizer state unchanged for that step and counts it
  # (`skipped_steps` in metrics.jsonl).
  config.train.nan_policy = 'stop'
  config.train.parallelism = 'jit'  # 'jit' (sharded jit) | 'shard_map' (explicit pmean)
  # Mixup / cutmix of each batch on device (vit_jax.mixup); targets become soft.
  config.mixup = ml_collections.ConfigDict()
  config.mixup.mixup_alpha = 0.0   # Beta(a, a) blending weight; 0 = no mixup.
  config.mixup.cutmix_alpha = 0.0  # Beta(a, a) pasted-box area; 0 = no cutmix.
  config.mixup.prob = 1.0          # Chance that a batch is mixed at all.
  config.mixup.switch_prob = 0.5   # Chance of cutmix (not mixup) when both are on.

  # ------------------------------------------------------------ int8 (quantization.py)
  # Post-training: python -m vit_jax.tools.quantize (these are its defaults).
  config.quantization = ml_collections.ConfigDict()
  config.quantization.qat = False  # Fake-quant int8 in the train step (QAT).
  config.quantization.rules = '.*'  # Regex over module paths to make int8.
  config.quantization.head = True   # The classifier too (False: keep it float).
  # int8 activations: 'dynamic' (per-token scales at run time) | 'static'
  # (calibrated; the quantize tool) | 'none' (weight-only, float products).
  config.quantization.activations = 'dynamic'
  config.quantization.calibration_examples = 512  # 'static': training examples.

  # ------------------------------------------------------------ pruning (pruning.py)
  # Zeroes weights during training, exactly (docs/compression.md).
  config.pruning = ml_collections.ConfigDict()
  # 'none' | 'magnitude' (smallest |w| per param) | 'n_m' (n of every m along a
  # kernel's input axis) | 'heads' (whole attention heads, lowest L2 norm).
  config.pruning.method = 'none'
  config.pruning.sparsity = 0.5    # Final fraction of zeros (magnitude, heads).
  # Regex over '/'-joined param paths (fully matched) of what is pruned; for
  # 'heads' the attention modules whose params it selects.
  config.pruning.rules = r'Transformer/encoderblock(?:_\d+)?/.*/kernel'
  config.pruning.n = 2             # n_m: keep n of every m weights.
  config.pruning.m = 4
  # Cubic ramp (Zhu & Gupta) from 0 at begin_step to sparsity at end_step
  # (None: 3/4 of total_steps); n_m is on from begin_step. Masks are
  # recomputed every update_every steps in between.
  config.pruning.begin_step = 0
  config.pruning.end_step = FieldReference(None, field_type=int)
  config.pruning.update_every = 100

  # ------------------------------------------------------------ devices (parallel.py)
  # Batches are split over `data`; `model` is the tensor-parallel group size
  # (within one host). docs/launch.md.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1            # -1: all devices not taken by `model`.
  config.mesh.model = 1
  # CPU hosts only: split the cores into this many XLA devices that run the step
  # data-parallel (applied at start-up, vit_jax/startup.py). 0 = JAX's default
  # (one device, or what XLA_FLAGS says).
  config.mesh.cpu_devices = 0
  # Sharding rules (vit_jax/sharding.py): a preset ('replicate' | 'fsdp' |
  # 'model' | 'fsdp+model', applied to every param) or ((regex, strategy), ...)
  # over '/'-joined param paths, first match wins, unmatched params replicated.
  # 'fsdp' and 'model' need train.parallelism='jit'.
  config.sharding = ml_collections.ConfigDict()
  config.sharding.rules = FieldReference('replicate', field_type=object)
  config.sharding.fsdp_min_size = 2**18  # fsdp leaves smaller arrays replicated.
  # XLA CPU flags that speed up `model.precision` (vit_jax/xla_flags.py), added
  # at start-up where this jaxlib knows them; XLA_FLAGS's own value of a flag
  # wins. False (or env VIT_JAX_XLA_AUTO_FLAGS=0): none. docs/launch.md.
  config.xla_auto_flags = True

  # ------------------------------------------------------------ checkpoints, metrics
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.keep = 3  # >= 2 lets a resume fall back past a damaged latest one.
  # Also keep the params of the k best evaluated steps by `best_metric` (any
  # name the evaluations log) in DIR/checkpoints_best/; tools read them with
  # --step=best (vit_jax/checkpoint/best.py). 0 = off.
  config.checkpoint.keep_best = 0
  config.checkpoint.best_metric = 'eval_test_top1'
  config.checkpoint.best_mode = 'auto'  # 'auto' (a *_loss lower, else higher) | 'max' | 'min'
  config.metrics = ml_collections.ConfigDict()
  # Peak FLOP/s per device behind MFU; None = the known peaks (vit_jax/flops.py).
  config.metrics.peak_flops = FieldReference(None, field_type=float)
  config.metrics.write_plot = True  # DIR/curves.png at the end of the run.
  return config
