"""The timm (PyTorch) side of `vit_jax.tools.benchmark --compare=timm`.

Builds timm's VisionTransformer with our model's shape (hidden, depth, heads,
MLP width, patch, classifier, tanh GELU) and a torch step doing the same work
as ours: train = forward + cross-entropy + backward + clipping + the config's
optimizer (AdamW with decay on weight matrices, as our `wd_mask`); infer =
forward under torch.inference_mode. Our float32 policy meets timm in float32;
mixed_bf16 and bfloat16 meet it under `torch.autocast(bfloat16)` (float32
weights and optimizer, bf16 products: timm's own mixed precision). The
`timm_compile` peer is the same step with the model under `torch.compile`
(inductor), compiled before it is timed. torch and timm are an optional extra
(requirements-bench.txt), imported only here.

`device` is where timm runs: 'cpu' (the default, benchmark.py's) or 'cuda'
(vit_jax.tools.gpu_benchmark): model, batch and autocast on that device, and
each run waits for the GPU's queued kernels before it returns, as our runs
wait for theirs. `grad_checkpointing` recomputes each block in the backward
pass (timm's own switch), what gpu_benchmark falls back to when timm's step
does not fit in the memory that our step left.
"""

import importlib.util
import sys
import time
from typing import Any, Callable

import ml_collections
import numpy as np

# Our registry's sizes -> timm's name for the same ViT (others: the closest
# name with every shape field overridden, which is what timm builds anyway).
_TIMM_NAMES = {192: 'vit_tiny_patch16_224', 384: 'vit_small_patch16_224',
               768: 'vit_base_patch16_224', 1024: 'vit_large_patch16_224'}
_POOLS = {'token': 'token', 'gap': 'avg'}
_SHAPE_ARGS = ('img_size', 'in_chans', 'patch_size', 'embed_dim', 'depth',
               'num_heads', 'mlp_ratio', 'global_pool', 'num_classes')
DEVICES = ('cpu', 'cuda')


def check_installed() -> None:
  """Fails fast, before anything is compiled or imported, without the extra."""
  missing = [m for m in ('torch', 'timm') if importlib.util.find_spec(m) is None]
  if missing:
    raise ImportError(
        f'--compare=timm needs {" and ".join(missing)}, which is not installed; '
        'install the optional extra: .venv/bin/pip install -r '
        'requirements-bench.txt')


def _import_torch_timm():
  # triton's native library crashes the process (SIGSEGV) when it is loaded
  # after TensorFlow's (torch 2.14.1 / triton 3.8.0 / tensorflow-cpu 2.21),
  # and torch loads it on import when it is installed. It only compiles GPU
  # kernels, which an eager timm step never uses: hide it.
  if 'tensorflow' in sys.modules:
    sys.modules.setdefault('triton', None)
  try:
    import timm  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'--compare=timm needs torch and timm ({e}); install the optional '
        'extra: .venv/bin/pip install -r requirements-bench.txt') from e
  return torch, timm


def timm_kwargs(fields: ml_collections.ConfigDict, shape: tuple[int, int, int],
                num_classes: int) -> tuple[str, dict[str, Any]]:
  """timm.create_model name and arguments for our model `fields`.

  Raises ValueError for what timm's plain ViT cannot mirror (hybrids, Mixer,
  a Fourier token mixer, FAVOR+ attention, token merging, a pre-logits layer,
  MAP pooling).
  """
  if fields.model_type != 'vit' or fields.get('resnet') is not None:
    raise ValueError(f'--compare=timm supports plain ViTs, not {fields.name}.')
  mixer = fields.get('token_mixer', 'attention')
  if mixer != 'attention':
    raise ValueError(f"--compare=timm: timm's VisionTransformer has no "
                     f'{mixer!r} token mixer, only softmax attention; compare '
                     f"a model with token_mixer='attention', not {fields.name}.")
  if fields.get('attention_impl') == 'favor':
    raise ValueError("--compare=timm: timm's VisionTransformer has no FAVOR+ "
                     "attention; compare with attention_impl='xla' (or "
                     "'fused').")
  if fields.get('tome_r'):
    raise ValueError('--compare=timm: timm has no token merging; compare with '
                     'model.tome_r=0.')
  if fields.get('conv_stem'):
    raise ValueError('--compare=timm supports plain ViTs, not a conv_stem '
                     f'{tuple(fields.conv_stem)} (set --config.model.conv_stem=()).')
  if fields.get('representation_size'):
    raise ValueError('--compare=timm: timm has no pre_logits layer; use a model '
                     'without representation_size.')
  if fields.classifier not in _POOLS:
    raise ValueError(f'--compare=timm: classifier {fields.classifier!r} not in '
                     f'{sorted(_POOLS)}.')
  size, _, channels = shape
  hidden = fields.hidden_size
  return _TIMM_NAMES.get(hidden, 'vit_base_patch16_224'), dict(
      pretrained=False, img_size=size, in_chans=channels,
      num_classes=num_classes, patch_size=tuple(fields.patch_size),
      embed_dim=hidden, depth=fields.num_layers, num_heads=fields.num_heads,
      mlp_ratio=fields.mlp_dim / hidden, global_pool=_POOLS[fields.classifier],
      class_token=fields.classifier == 'token', act_layer='gelu_tanh',
      drop_rate=fields.dropout_rate, attn_drop_rate=fields.attention_dropout_rate,
      drop_path_rate=fields.stochastic_depth)


def _optimizer(torch, model, config: ml_collections.ConfigDict):
  """The config's optimizer in torch: decay (if any) on weight matrices only."""
  decay = [p for n, p in model.named_parameters()
           if n.endswith('.weight') and p.ndim >= 2]
  others = [p for n, p in model.named_parameters()
            if not (n.endswith('.weight') and p.ndim >= 2)]
  wd = float(config.optim.weight_decay)
  groups = [{'params': decay, 'weight_decay': wd},
            {'params': others, 'weight_decay': 0.0}]
  opt, lr = config.optim, float(config.schedule.base_lr)
  if opt.name == 'sgd':
    return torch.optim.SGD(groups, lr=lr, momentum=opt.momentum,
                           nesterov=opt.nesterov)
  cls = torch.optim.AdamW if opt.name == 'adamw' else torch.optim.Adam
  return cls(groups, lr=lr, betas=(opt.b1, opt.b2), eps=opt.eps)


def build_timm_step(fields: ml_collections.ConfigDict, mode: str, batch: int,
                    shape: tuple[int, int, int], num_classes: int,
                    config: ml_collections.ConfigDict, precision: str,
                    compiled: bool = False, device: str = 'cpu',
                    grad_checkpointing: bool = False
                    ) -> tuple[Callable[[int], int], dict[str, Any]]:
  """run(n) doing n torch steps on `device`, and facts (timm_model, params,
  threads, timm_precision; timm_compile_s for the compiled peer)."""
  if device not in DEVICES:
    raise ValueError(f'timm device {device!r} not in {DEVICES}')
  name, kwargs = timm_kwargs(fields, shape, num_classes)  # Refuses before torch.
  torch, timm = _import_torch_timm()
  if device == 'cuda' and not torch.cuda.is_available():
    raise ValueError("timm device 'cuda': torch sees no CUDA GPU (a CPU-only "
                     "torch build, or no GPU visible); use device 'cpu'")
  model = timm.create_model(name, **kwargs).to(device)
  if grad_checkpointing:
    model.set_grad_checkpointing(True)
  forward = torch.compile(model) if compiled else model
  rng = np.random.default_rng(0)
  size, _, channels = shape
  images = torch.from_numpy(  # NCHW, as torch convolutions expect.
      rng.uniform(-1, 1, (batch, channels, size, size)).astype(np.float32)
  ).to(device)
  labels = torch.from_numpy(
      rng.integers(0, num_classes, batch).astype(np.int64)).to(device)
  use_autocast = precision != 'float32'
  autocast = lambda: torch.autocast(device, dtype=torch.bfloat16,
                                    enabled=use_autocast)
  # CUDA kernels run queued behind the Python loop: wait for all of them.
  synchronize = torch.cuda.synchronize if device == 'cuda' else lambda: None
  clip = float(config.optim.grad_clip_norm)
  smoothing = float(config.train.label_smoothing)

  if mode == 'train':
    model.train()
    optimizer = _optimizer(torch, model, config)

    def run(n: int) -> int:
      for _ in range(n):
        optimizer.zero_grad(set_to_none=True)
        with autocast():
          logits = forward(images)
        loss = torch.nn.functional.cross_entropy(
            logits.float(), labels, label_smoothing=smoothing)
        loss.backward()
        if clip > 0:
          torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
      loss.item()  # Synchronises (a no-op on CPU, where torch is eager).
      synchronize()  # The optimizer's kernels, queued after the loss.
      return n
  else:
    model.eval()

    def run(n: int) -> int:
      with torch.inference_mode(), autocast():
        for _ in range(n):
          out = forward(images)
      out.float().sum().item()
      synchronize()
      return n

  facts = {}
  if compiled:  # Compiling (forward and backward graphs) is not timed.
    start = time.perf_counter()
    run(1)
    facts['timm_compile_s'] = time.perf_counter() - start
  return run, {
      **facts, 'timm_precision': 'autocast_bf16' if use_autocast else 'float32',
      'timm_model': f'{name}(' + ', '.join(  # The name alone hides overrides.
          f'{k}={kwargs[k]}' for k in _SHAPE_ARGS) + ')',
      'timm_version': timm.__version__,
      'torch_version': torch.__version__, 'torch_threads': torch.get_num_threads(),
      'timm_params': sum(p.numel() for p in model.parameters())}
