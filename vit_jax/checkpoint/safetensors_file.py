"""`.safetensors` files of params: checked reads, atomic writes, which layout.

safetensors holds named arrays and a JSON header that gives every array's
dtype and shape before its bytes are read, and it never unpickles anything, so
a file from elsewhere can be checked as data: `read_arrays` refuses what is
not a float tensor or not the shape the caller expects before loading it. It
reads with the safetensors numpy API (no torch needed); float16 and bfloat16
tensors come back as float32.

A file of params is in one of two naming layouts, told apart by its names:

  released  ours (`python -m vit_jax.tools.export --safetensors`): the
            '/'-joined `.npz` names (`embedding/kernel`, ...).
  timm      a timm VisionTransformer `state_dict` (`patch_embed.proj.weight`,
            `blocks.0.attn.qkv.weight`, ...; vit_jax.checkpoint.timm_layout).

`read_params` turns either into the released layout for `load_pretrained`.
A Hugging Face ViT's `model.safetensors` needs its `config.json` (heads, image
size): pass the directory (vit_jax.checkpoint.hf).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from etils import epath
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np

from vit_jax.checkpoint.layouts import convert_to_released_layout

SUFFIX = '.safetensors'
# Dtypes a params tensor may have in a file (safetensors' names); all read
# back as float32.
_FLOAT_DTYPES = ('F16', 'BF16', 'F32', 'F64')
# The first names of a Hugging Face transformers ViT (with or without the
# ViTForImageClassification `vit.` prefix).
_HF_PREFIXES = ('vit.', 'embeddings.', 'encoder.layer.')

# name -> the shape it must have; raises ValueError naming what is wrong.
ShapeCheck = Callable[[str, tuple[int, ...]], None]


def is_safetensors(path: str | epath.PathLike) -> bool:
  """A file named `*.safetensors` (read as one; a wrong file is refused then)."""
  path = epath.Path(path)
  return path.name.endswith(SUFFIX) and not path.is_dir()


def tensor_shapes(path: str | epath.PathLike) -> dict[str, tuple[int, ...]]:
  """name -> shape of every tensor in the file, from its header only.

  Raises:
    FileNotFoundError: nothing at `path`.
    ValueError: not a readable safetensors file, or a tensor that is not
      float (an integer or bool tensor is no parameter of ours).
  """
  shapes = {}
  with _open(path) as f:
    for name in f.keys():
      tensor = f.get_slice(name)
      dtype = tensor.get_dtype()
      if dtype not in _FLOAT_DTYPES:
        raise ValueError(f'{path}: tensor {name!r} has dtype {dtype}; params '
                         f'must be one of {_FLOAT_DTYPES}.')
      shapes[name] = tuple(int(n) for n in tensor.get_shape())
  if not shapes:
    raise ValueError(f'{path} holds no tensors.')
  return shapes


def read_arrays(path: str | epath.PathLike,
                check: ShapeCheck | None = None) -> dict[str, np.ndarray]:
  """name -> float32 array of every tensor in `path`, in the file's order.

  `check(name, shape)` sees every tensor's name and shape (from the header)
  before any tensor's bytes are read, and raises for what the caller cannot
  use.
  """
  shapes = tensor_shapes(path)
  if check is not None:
    for name, shape in shapes.items():
      check(name, shape)
  with _open(path) as f:
    return {name: np.asarray(f.get_tensor(name), np.float32)
            for name in shapes}


def read_params(path: str | epath.PathLike,
                like: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A params `.safetensors` (ours or a timm state dict) in released names.

  Args:
    path: the file.
    like: the flat released-layout params of the model that will read it: a
      timm file fuses q/k/v into one [3 * hidden, hidden] weight, which does
      not say how many heads it splits into; the model's query kernels do.

  Raises:
    ValueError: a Hugging Face file (its directory is what loads), names of
      no layout we read, or tensors of the wrong dtype or shape.
  """
  # Here: timm_layout reads this module's arrays.
  from vit_jax.checkpoint import timm_layout  # pylint: disable=g-import-not-at-top
  names = list(tensor_shapes(path))
  if any('/' in name for name in names):  # timm and HF names have none.
    return convert_to_released_layout(read_arrays(path))
  if any(name.startswith(_HF_PREFIXES) for name in names):
    raise ValueError(
        f'{path} holds Hugging Face ViT names ({names[0]!r}, ...); pass the '
        'directory with its config.json (the heads and image size are there), '
        'not the .safetensors file alone.')
  if timm_layout.is_timm_state_dict(names):
    return timm_layout.read_timm_state_dict(path, like)
  raise ValueError(
      f'{path}: names such as {names[:3]} are neither our released layout '
      "('embedding/kernel', ...) nor a timm VisionTransformer state dict "
      "('patch_embed.proj.weight', 'blocks.0.attn.qkv.weight', ...).")


def write_arrays(path: str | epath.PathLike, flat: Mapping[str, np.ndarray],
                 metadata: Mapping[str, str] | None = None) -> None:
  """Writes `flat` as safetensors under a temporary name, renamed over `path`."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  arrays = {name: np.ascontiguousarray(value) for name, value in flat.items()}
  blob = st_numpy.save(arrays, metadata=dict(metadata or {}))
  target = epath.Path(path)
  tmp = target.parent / f'.{target.name}.tmp'
  tmp.write_bytes(blob)
  tmp.replace(target)


def _open(path: str | epath.PathLike):
  """safetensors' reader of `path`, its errors as ValueError naming the file."""
  try:
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'reading {path} needs the safetensors package: '
                      '`pip install safetensors`.') from e
  if not epath.Path(path).exists():
    raise FileNotFoundError(f'No checkpoint file at {path}')
  try:
    return safe_open(str(path), framework='np')
  except Exception as e:  # pylint: disable=broad-except
    # SafetensorError (a truncated file, a bad header) is no ValueError.
    raise ValueError(f'{path} could not be read as a safetensors file '
                     f'({type(e).__name__}: {e}).') from None
