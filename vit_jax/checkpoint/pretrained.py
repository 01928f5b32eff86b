"""Fine-tuning params from a pre-trained checkpoint: `load_pretrained`.

The source is a released / Linen / big_vision `.npz`, one of our workdirs (its
`checkpoints/`, or one `checkpoints/<step>`), a Hugging Face ViT directory, a
`.safetensors` file (our names or a timm state dict), or a params tree already
in memory. Whatever it is, the same rules turn it into the params of the model
to fine-tune: the backbone is taken by name, the task head is the model's own
(fresh), `pre_logits` is kept or dropped as asked, and the position embedding
is resized to the model's patch grid (vit_jax.checkpoint.posemb), the patch
embedding to the model's patch size (vit_jax.checkpoint.patch_resize). Matching
happens in the released per-block layout; a scanned model (`scan_layers`) gets
its blocks stacked back at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging
from etils import epath
import numpy as np

from vit_jax.checkpoint import hf
from vit_jax.checkpoint import hf_config
from vit_jax.checkpoint import npz
from vit_jax.checkpoint import orbax_state
from vit_jax.checkpoint import safetensors_file
from vit_jax.checkpoint import workdir_reader
from vit_jax.checkpoint.layouts import BLOCK_RE
from vit_jax.checkpoint.layouts import POSEMB_KEY
from vit_jax.checkpoint.layouts import Params
from vit_jax.checkpoint.layouts import convert_to_released_layout
from vit_jax.checkpoint.layouts import flatten_params
from vit_jax.checkpoint.layouts import is_scanned
from vit_jax.checkpoint.layouts import stack_encoder_blocks
from vit_jax.checkpoint.layouts import unflatten_params
from vit_jax.checkpoint.layouts import unstack_encoder_blocks
from vit_jax.checkpoint import patch_resize as patch_resizing
from vit_jax.checkpoint.posemb import METHODS as POSEMB_METHODS
from vit_jax.checkpoint.posemb import resize_global_filter
from vit_jax.checkpoint.posemb import resize_posemb
from vit_jax.config_checks import require
from vit_jax.metrics import summarize_names

def check_config(config: Any) -> None:
  """Raises ConfigError for pretrained-loading keys that cannot work: a
  `pretrained_path` that does not exist, an unknown posemb resize method;
  ValueError for a file its headers show to be unreadable."""
  if config.pretrained_path:
    require(epath.Path(config.pretrained_path).exists(),
            f'config.pretrained_path {config.pretrained_path} does not exist')
    _check_file_format(config.pretrained_path)
  require(config.pretrained.posemb_resize in POSEMB_METHODS,
          f'config.pretrained.posemb_resize {config.pretrained.posemb_resize!r} '
          f'not in {POSEMB_METHODS}')
  require(config.pretrained.filter_resize in FILTER_RESIZE,
          f'config.pretrained.filter_resize {config.pretrained.filter_resize!r} '
          f'not in {FILTER_RESIZE}')
  require(config.pretrained.patch_resize in patch_resizing.METHODS,
          f'config.pretrained.patch_resize {config.pretrained.patch_resize!r} '
          f'not in {patch_resizing.METHODS}')


def _check_file_format(path: str) -> None:
  """Refuses a file that is not what it claims from its headers alone (no
  array data read, nothing unpickled), so a text file named `.npz` or a
  pickled one is refused before anything compiles, not at load time."""
  if hf.is_hf_dir(path):
    hf_config.read_hf_config(path)  # Its tensors are checked on load.
  elif _workdir_source(path) is not None:
    return  # A workdir: its checkpoints are verified by load_pretrained.
  elif safetensors_file.is_safetensors(path):
    safetensors_file.tensor_shapes(path)
  else:
    npz.read_npz(path, names=())


# What load_pretrained does with a GFNet filter trained on another patch grid:
# 'bicubic' resizes it as the official code does; 'none' refuses to load it.
FILTER_RESIZE = ('bicubic', 'none')
_FILTER_SUFFIX = '/complex_weight'


# Top-level modules that belong to the task, not to the pre-trained backbone.
_TASK_MODULES = ('head', 'pre_logits')


@dataclasses.dataclass
class LoadReport:
  """What `load_pretrained` did with each tensor name.

  Attributes:
    loaded: taken from the checkpoint as is.
    resized: taken from the checkpoint and resized: name -> (file, new) shape.
    reinitialised: kept from `init_params` (the task head, a fresh pre_logits).
    left_out: in the checkpoint but not used (its head, a dropped pre_logits).
  """
  loaded: list[str] = dataclasses.field(default_factory=list)
  resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = (
      dataclasses.field(default_factory=dict))
  reinitialised: list[str] = dataclasses.field(default_factory=list)
  left_out: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    resized = ', '.join(f'{k} {a}->{b}' for k, (a, b) in self.resized.items())
    return (f'loaded {len(self.loaded)}: {summarize_names(self.loaded)}; '
            f'resized {len(self.resized)}: {resized or "none"}; '
            f're-initialised {len(self.reinitialised)}: '
            f'{summarize_names(self.reinitialised)}; '
            f'left out {len(self.left_out)}: {summarize_names(self.left_out)}')


def load_pretrained(
    path: str | epath.PathLike | Mapping[str, Any],
    init_params: Mapping[str, Any],
    *,
    keep_pre_logits: bool | None = None,
    keep_head: bool = False,
    posemb_method: str = 'linear',
    posemb_grid: tuple[int, int] | None = None,
    ckpt_posemb_grid: tuple[int, int] | None = None,
    filter_resize: str = 'bicubic',
    patch_resize: str = 'pi',
    source: str = 'the pre-trained params',
    log: Callable[[str], Any] = logging.info,
) -> tuple[Params, LoadReport]:
  """Builds fine-tuning params: the checkpoint's backbone, the model's head.

  Args:
    path: released, Linen or big_vision `.npz` file; a workdir of ours, its
      `checkpoints/` dir (latest step) or one `checkpoints/<step>`; a
      Hugging Face ViT directory (vit_jax.checkpoint.hf); a `.safetensors`
      of our released names or a timm ViT state dict
      (vit_jax.checkpoint.safetensors_file); or an already loaded params
      tree (nested or flat '/'-joined names in any of those layouts).
    init_params: freshly initialised params of the model to fine-tune (concrete
      arrays: head and re-initialised pre_logits values are taken from here).
    keep_pre_logits: None (default) keeps the checkpoint's `pre_logits` if the
      model has that layer and the file has it (else the model's fresh one);
      True requires the file to have it; False always uses the fresh one. When
      the model has no `pre_logits`, the file's is left out.
    keep_head: also take the file's classifier `head` (for fine-tuning on the
      classes it was trained on: quantization-aware training, pruning); the
      file must have one of the model's shape. False (default): a fresh head.
    posemb_method: 'linear' (reference) or 'bicubic' (timm); see resize_posemb.
    posemb_grid: the model's patch grid (h, w) when it is not square.
    ckpt_posemb_grid: the checkpoint's patch grid when it is not square.
    filter_resize: 'bicubic' resizes GFNet `complex_weight`s of another grid
      (as the official code does; see resize_global_filter) to `posemb_grid`
      or the grid of the model's position embedding; 'none' refuses.
    patch_resize: a patch embedding of another patch size (same channels and
      width): 'pi' (FlexiViT's pseudo-inverse resize, which keeps the tokens),
      'bilinear' (the kernel resized), or 'none' (refused); see
      vit_jax.checkpoint.patch_resize. Refused for a model with a stem.
    source: what to call a `path` given as a tree in messages.
    log: receives one line listing what was loaded, resized, re-initialised
      and left out.

  Returns:
    (params, report): nested dicts of numpy arrays with init_params' structure
    and dtypes (its encoder blocks stacked if init_params' are: a scanned
    model), and a `LoadReport` (which names tensors per block).

  Raises:
    FileNotFoundError: nothing at `path`, or a directory without checkpoints.
    ValueError: the checkpoint misses or adds backbone tensors, or shapes
      differ; the message lists the names and the likely cause.
  """
  if set(init_params) == {'params'}:
    raise ValueError("Pass variables['params'] as init_params, not the whole "
                     'variables dict.')
  scanned = is_scanned(init_params)
  # All matching happens in the released per-block layout; a scanned model's
  # blocks are stacked again at the end.
  init = flatten_params(unstack_encoder_blocks(init_params))
  if isinstance(path, Mapping):
    ckpt = convert_to_released_layout(flatten_params(path))
    path = source
  elif hf.is_hf_dir(path):
    ckpt = hf.read_hf_dir(path)
  elif (workdir := _workdir_source(path)) is not None:
    tree = workdir_reader.load_params(*workdir)
    ckpt = convert_to_released_layout(flatten_params(tree))
  elif safetensors_file.is_safetensors(path):
    ckpt = safetensors_file.read_params(path, like=init)
  else:
    ckpt = convert_to_released_layout(npz.read_npz(path))

  model_has_pre_logits = any(k.startswith('pre_logits/') for k in init)
  file_has_pre_logits = any(k.startswith('pre_logits/') for k in ckpt)
  if keep_pre_logits and not model_has_pre_logits:
    raise ValueError('keep_pre_logits=True but the model has no pre_logits '
                     'layer (set its representation_size).')
  if keep_pre_logits and not file_has_pre_logits:
    raise ValueError(f'keep_pre_logits=True but {path} has no pre_logits.')
  task_modules = set(_TASK_MODULES)
  if keep_head:
    _check_head(path, ckpt, init)
    task_modules.discard('head')
  if (model_has_pre_logits and file_has_pre_logits
      and keep_pre_logits is not False):
    task_modules.discard('pre_logits')
  is_task = lambda name: name.split('/', 1)[0] in task_modules

  missing = [k for k in init if not is_task(k) and k not in ckpt]
  unexpected = [k for k in ckpt if not is_task(k) and k not in init]
  if missing or unexpected:
    raise ValueError(_names_message(path, missing, unexpected, ckpt, init))

  report = LoadReport()
  report.left_out = [k for k in ckpt if is_task(k)]
  params = {}
  for name, init_value in init.items():
    if is_task(name):
      params[name] = init_value
      report.reinitialised.append(name)
      continue
    value = ckpt[name]
    if (name == patch_resizing.EMBEDDING_KEY
        and patch_resizing.differs_in_patch_size(value, init_value)):
      value = patch_resizing.load_patch_kernel(
          value, init_value.shape, method=patch_resize, source=str(path),
          stem=_stem_of(init))
    grid_given = posemb_grid is not None or ckpt_posemb_grid is not None
    if (name == POSEMB_KEY and value.ndim == 3
        and (value.shape != init_value.shape or grid_given)
        and value.shape[::2] == init_value.shape[::2]):
      value = resize_posemb(
          value, posemb_grid or init_value.shape[1],
          num_prefix_tokens=1 if 'cls' in init_params else 0,
          method=posemb_method, old_grid=ckpt_posemb_grid)
    if (name.endswith(_FILTER_SUFFIX) and value.shape != init_value.shape
        and value.shape[2:] == init_value.shape[2:]):
      if filter_resize == 'none':
        raise ValueError(
            f'{path}: the global filter {name} was trained for another patch '
            f'grid ({value.shape[:2]} frequencies, the model has '
            f'{init_value.shape[:2]}) and filter_resize is \'none\'; set '
            "config.pretrained.filter_resize='bicubic' to resize it")
      value = resize_global_filter(
          value, posemb_grid or _grid_of(init, init_value.shape[0]))
    if value is ckpt[name] or np.array_equal(value, ckpt[name]):
      report.loaded.append(name)
    else:
      report.resized[name] = (ckpt[name].shape, value.shape)
    params[name] = value.astype(init_value.dtype, copy=False)

  mismatched = [k for k in params if params[k].shape != init[k].shape]
  if mismatched:
    lines = [f'  {k}: checkpoint {params[k].shape} vs model {init[k].shape}'
             for k in mismatched]
    raise ValueError(f'Shapes in {path} do not match the model:\n'
                     + '\n'.join(_clip(lines)) + _arch_hint(ckpt, init))
  log(f'Loaded pre-trained params from {path}: {report.summary()}')
  tree = unflatten_params(params)
  return (stack_encoder_blocks(tree) if scanned else tree), report


def _check_head(path, ckpt: Mapping[str, Any], init: Mapping[str, Any]):
  """keep_head needs the file's head to be the model's: same names, shapes."""
  heads = lambda tree: {k: np.shape(v) for k, v in tree.items()
                        if k.startswith('head/')}
  file_head, model_head = heads(ckpt), heads(init)
  if not file_head:
    raise ValueError(f'keep_head=True but {path} has no classifier head.')
  if file_head != model_head:
    classes = lambda h: h.get('head/bias', ('?',))[-1]
    raise ValueError(
        f'keep_head=True but the head in {path} is not the model\'s: '
        f'{classes(file_head)} classes there, {classes(model_head)} in the '
        f'model ({file_head} vs {model_head}); keep_head is for fine-tuning '
        'on the classes the file was trained on.')


def _stem_of(init: Mapping[str, Any]) -> str | None:
  """The stem under the model's patch embedding, if any (hybrid, conv stem)."""
  if 'conv_root/kernel' in init:
    return 'ResNet'
  if any(k.startswith('conv_stem/') for k in init):
    return 'conv_stem'
  return None


def _grid_of(init: Mapping[str, Any], h: int) -> tuple[int, int]:
  """The model's patch grid (h rows): from its position embedding, else
  square (a filter's w//2+1 frequencies cannot tell an odd w from w-1)."""
  posemb = init.get(POSEMB_KEY)
  if posemb is not None and posemb.shape[1] % h == 0:
    return h, posemb.shape[1] // h
  return h, h


def _names_message(path, missing, unexpected, ckpt, init) -> str:
  parts = [f'{path} does not match the model.']
  if missing:
    parts.append(f'Missing from the checkpoint ({len(missing)}): '
                 + ', '.join(_clip(missing)))
  if unexpected:
    parts.append(f'Unexpected in the checkpoint ({len(unexpected)}): '
                 + ', '.join(_clip(unexpected)))
  if ('cls' in ckpt) != ('cls' in init):
    parts.append("Only one side has a 'cls' token: the checkpoint and model "
                 "use different pooling (classifier='token' vs gap/map).")
  if (POSEMB_KEY in ckpt) != (POSEMB_KEY in init):
    parts.append('Only one side has a learned posemb: the model may use '
                 "posemb='sincos2d' (no params) while the file has learned "
                 'ones, or the other way round.')
  return '\n'.join(parts) + _arch_hint(ckpt, init)


def _arch_hint(ckpt: Mapping[str, np.ndarray],
               init: Mapping[str, np.ndarray]) -> str:
  """Names the architecture properties that differ, e.g. the hidden size."""
  a, b = _describe(ckpt), _describe(init)
  diffs = [f'{prop} {a[prop]} vs {b[prop]}' for prop in a
           if prop in b and a[prop] != b[prop]]
  if not diffs:
    return ''
  return ('\nThe checkpoint looks like a different architecture '
          '(checkpoint vs model): ' + ', '.join(diffs) + '.')


def _describe(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  props: dict[str, Any] = {}
  stem = flat.get('embedding/kernel', flat.get('stem/kernel'))
  if stem is not None and stem.ndim == 4:
    props['patch size'] = tuple(stem.shape[:2])
    props['hidden size'] = stem.shape[-1]
  blocks = {m.group(1) for m in map(BLOCK_RE.match, flat) if m}
  blocks |= {k.split('/')[0] for k in flat if k.startswith('MixerBlock_')}
  if blocks:
    props['layers'] = len(blocks)
  query = flat.get(
      'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel')
  if query is not None and query.ndim == 3:
    props['heads'] = query.shape[1]
  mlp = flat.get('Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel')
  if mlp is not None and mlp.ndim == 2:
    props['mlp size'] = mlp.shape[1]
  props['hybrid ResNet stem'] = 'conv_root/kernel' in flat
  return props


def _clip(items: list[str], limit: int = 12) -> list[str]:
  if len(items) <= limit:
    return list(items)
  return list(items[:limit]) + [f'... and {len(items) - limit} more']


def _workdir_source(path: str | epath.PathLike) -> tuple[str, int | None] | None:
  """(checkpoints dir, step or None) if `path` is a workdir of ours, None for a file."""
  path = epath.Path(path)
  if not path.is_dir():
    return None
  if path.name.isdigit() and path.parent.name == orbax_state.CHECKPOINT_DIR:
    return str(path.parent), int(path.name)
  if path.name == orbax_state.CHECKPOINT_DIR or (
      path / orbax_state.CHECKPOINT_DIR).is_dir():
    return str(path), None
  raise FileNotFoundError(
      f'{path} is a directory without {orbax_state.CHECKPOINT_DIR}/ or '
      f'{hf_config.CONFIG_FILE}: a pre-trained checkpoint is an .npz or '
      '.safetensors file, a workdir, its checkpoints/ directory, '
      'checkpoints/<step>, or a Hugging Face ViT directory.')
