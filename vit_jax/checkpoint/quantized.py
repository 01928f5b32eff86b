"""The int8 model file: one `.npz` in the released names, plus what rebuilds it.

A quantized kernel is stored under its released name (`.../Dense_0/kernel`,
`embedding/kernel` [ph, pw, c, hidden]) as int8, in the float kernel's shape,
with its float32 per-output-channel scale beside it (`.../kernel_scale`).
Static activation scales keep qwix's names (`.../dot_general0_lhs_scale`).
Every other parameter (biases, LayerNorms, position embedding, the float
modules) is stored as in a float export. One more entry,
`__vit_jax_quantized__`, holds JSON as uint8 bytes: the quantization settings,
the model section, input size, channels, class names, eval preprocessing and
the training config (if it came from a workdir), so that the tools can
rebuild the int8 model from the file alone. Nothing is pickled.

Reading checks every array against the model the metadata describes (names,
shapes, dtypes) before anything runs; `checkpoint.load_npz` refuses such a
file, since its int8 arrays are not float params.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

from etils import epath
from flax import traverse_util
import numpy as np

from vit_jax.checkpoint import npz

MARKER = npz.QUANTIZED_MARKER
FORMAT = 'vit_jax-int8/1'
SCALE_SUFFIX = '_scale'
PyTree = Any


def _is_with_aux(x: Any) -> bool:
  """A qwix PTQ leaf: `.array` holds an int8 QArray or an activation scale."""
  return type(x).__name__ == 'WithAux' and hasattr(x, 'array')


def _is_int8(leaf: Any) -> bool:
  return hasattr(leaf.array, 'qvalue') and hasattr(leaf.array, 'scale')


def _flat(tree: PyTree) -> dict[str, Any]:
  """'/'-joined name -> leaf; a qwix WithAux is not a dict, so it is one leaf."""
  return traverse_util.flatten_dict(tree, sep='/')


def is_quantized(path: str | epath.PathLike) -> bool:
  """Whether `path` is an .npz written by `save` (reads only the zip index)."""
  path = epath.Path(path)
  if not path.is_file():
    return False
  try:
    with path.open('rb') as f, np.load(f, allow_pickle=False) as z:
      return MARKER in z.files
  except Exception:  # pylint: disable=broad-except
    return False  # Not an npz at all: the float loaders say what it is.


def to_arrays(qparams: PyTree, float_params: PyTree) -> dict[str, np.ndarray]:
  """The file's arrays for `qparams` (vit_jax.quantization.quantize_params);
  `float_params` give each int8 kernel its stored (released) shape."""
  shapes = {k: np.shape(v) for k, v in _flat(float_params).items()}
  arrays = {}
  for name, leaf in _flat(qparams).items():
    if not _is_with_aux(leaf):
      arrays[name] = np.asarray(leaf, np.float32)
    elif _is_int8(leaf):
      q = leaf.array
      if q.zero_point is not None:
        raise ValueError(f'{name}: asymmetric (zero-point) int8 is not stored')
      arrays[name] = np.asarray(q.qvalue, np.int8).reshape(shapes[name])
      arrays[name + SCALE_SUFFIX] = np.asarray(q.scale, np.float32)
    else:  # A static activation scale.
      arrays[name] = np.asarray(leaf.array, np.float32)
  return arrays


def save(path: str | epath.PathLike, qparams: PyTree, float_params: PyTree,
         meta: dict[str, Any]) -> int:
  """Writes the int8 file atomically; returns its size in bytes.

  Deflated: on a small model the per-array npy headers and the metadata weigh
  as much as a few layers, and they compress well (docs/compression.md).
  """
  arrays = to_arrays(qparams, float_params)
  import qwix  # pylint: disable=g-import-not-at-top  (the caller has it)
  text = json.dumps(dict(meta, format=FORMAT, qwix=qwix.__version__))
  arrays[MARKER] = np.frombuffer(text.encode('utf-8'), np.uint8)
  npz.write_arrays(path, arrays, compress=True)
  return epath.Path(path).stat().length


def read(path: str | epath.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(arrays, metadata) of an int8 file; raises ValueError naming the file
  if it is not one or its metadata cannot be read."""
  arrays = npz.read_npz(path)
  return arrays, _metadata(arrays.pop(MARKER, None), path)


def read_metadata(path: str | epath.PathLike) -> dict[str, Any]:
  """The metadata of an int8 file alone: the other arrays are not read
  (their headers are checked, npz.read_npz)."""
  return _metadata(npz.read_npz(path, names=(MARKER,)).get(MARKER), path)


def _metadata(raw: np.ndarray | None, path: str | epath.PathLike) -> dict[str, Any]:
  if raw is None:
    raise ValueError(f'{path} is not an int8 model written by '
                     'vit_jax.tools.quantize (no quantization metadata).')
  try:
    if raw.dtype != np.uint8 or raw.ndim != 1:
      raise ValueError(f'metadata is {raw.dtype} {raw.shape}, not uint8 bytes')
    meta = json.loads(raw.tobytes().decode('utf-8'))
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: unreadable quantization metadata ({e}).') from None
  if meta.get('format') != FORMAT:
    raise ValueError(f'{path}: format {meta.get("format")!r}, this version '
                     f'reads {FORMAT!r}.')
  return meta


def from_arrays(arrays: dict[str, np.ndarray], abstract: PyTree,
                source: str, float_abstract: PyTree) -> PyTree:
  """The PTQ params tree of `abstract` (the PTQ model's eval_shape'd params)
  filled from the file's arrays; every name, shape and dtype is checked.

  `float_abstract` (the float model's eval_shape'd params) gives the shape an
  int8 kernel is stored in: qwix may hold it in another (a conv kernel
  [ph, pw, c, hidden] as [ph * pw * c, hidden]), so a kernel stored in the
  wrong order of the same size is told apart.
  """
  problems, used, flat = [], set(), {}
  float_shapes = {k: tuple(v.shape) for k, v in _flat(float_abstract).items()}

  def take(name: str, shape: tuple[int, ...], dtype: Any,
           stored: tuple[int, ...] | None = None) -> np.ndarray | None:
    used.add(name)
    stored = tuple(shape if stored is None else stored)
    if name not in arrays:
      problems.append(f'  missing: {name} {stored}')
      return None
    value = arrays[name]
    if value.dtype != np.dtype(dtype) or value.shape != stored:
      problems.append(f'  {name}: file {value.dtype} {value.shape} vs model '
                      f'{np.dtype(dtype)} {stored}')
      return None
    return value.reshape(shape)

  for name, leaf in _flat(abstract).items():
    if _is_with_aux(leaf) and _is_int8(leaf):
      q = leaf.array
      qvalue = take(name, q.qvalue.shape, np.int8,
                    float_shapes.get(name, q.qvalue.shape))
      scale = take(name + SCALE_SUFFIX, q.scale.shape, np.float32)
      flat[name] = leaf.replace(array=dataclasses.replace(
          q, qvalue=qvalue, scale=scale))
    elif _is_with_aux(leaf):
      flat[name] = leaf.replace(array=take(name, leaf.array.shape, np.float32))
    else:
      flat[name] = take(name, leaf.shape, leaf.dtype)
  problems += [f'  unexpected: {k} {arrays[k].shape}' for k in arrays
               if k not in used]
  if problems:
    raise ValueError(f'{source} does not fit the int8 model its metadata '
                     'describes:\n' + '\n'.join(problems[:12]))
  return traverse_util.unflatten_dict(flat, sep='/')


def float_export_bytes(float_params: PyTree) -> int:
  """Size of the same model's float32 export (tools.export), measured by
  writing it to memory."""
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v, np.float32)
                   for k, v in _flat(float_params).items()})
  return buf.tell()
