"""The released `.npz` checkpoint file: write it, read it, refuse what it is not.

A released ViT/Mixer checkpoint is `np.savez` of the params tree flattened to
'/'-joined names (`Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`). This
project's modules use those names, so a params tree and a released file map
one to one. `load_npz` also reads Linen-layout and big_vision files, converting
their names (vit_jax.checkpoint.layouts).

Files are always per block: a scanned model's stacked blocks are unstacked on
write, and `load_npz` returns per-block trees. All paths go through
`etils.epath`, so `gs://` works wherever TF's gfile does.
"""

from __future__ import annotations

import uuid
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

from absl import logging
from etils import epath
import jax.numpy as jnp
import numpy as np

from vit_jax.checkpoint.layouts import Params
from vit_jax.checkpoint.layouts import convert_to_released_layout
from vit_jax.checkpoint.layouts import flatten_params
from vit_jax.checkpoint.layouts import unflatten_params
from vit_jax.checkpoint.layouts import unstack_encoder_blocks

# The metadata entry of an int8 file (vit_jax.checkpoint.quantized).
QUANTIZED_MARKER = '__vit_jax_quantized__'



def save_npz(path: str | epath.PathLike, params: Mapping[str, Any]) -> None:
  """Writes `params` (our names = released names) as a released `.npz`.

  A scanned model's stacked blocks are written per block (`encoderblock_{i}`),
  so every file this writes reads like a released one, whatever `scan_layers`.

  The file is written under a temporary name in the same directory and then
  renamed over `path`, so an existing checkpoint is never left half-written.
  bfloat16 and other non-numpy float types are stored as float32 (numpy cannot
  read them back from an .npz); numpy dtypes are kept as they are.
  """
  if set(params) == {'params'}:
    raise ValueError("Pass variables['params'], not the whole variables dict.")
  flat = {k: _numpy_dtype(k, v)
          for k, v in flatten_params(unstack_encoder_blocks(params)).items()}
  if not flat:
    raise ValueError(f'Refusing to write {path}: params tree has no arrays.')
  write_arrays(path, flat)


def write_arrays(path: str | epath.PathLike, flat: Mapping[str, np.ndarray],
                 *, compress: bool = False) -> None:
  """`np.savez` of `flat` (no pickling; `compress`: `np.savez_compressed`),
  written under a temporary name and renamed over `path`, so an existing file
  is never left half-written."""
  path = epath.Path(path)
  tmp = path.parent / f'.{path.name}.tmp-{uuid.uuid4().hex}'
  try:
    with tmp.open('wb') as f:
      (np.savez_compressed if compress else np.savez)(
          f, allow_pickle=False, **flat)
    tmp.replace(path)
  except BaseException:
    try:
      if tmp.exists():
        tmp.unlink()
    except Exception:  # pylint: disable=broad-except
      logging.warning('Could not remove temporary file %s', tmp)
    raise


def _numpy_dtype(name: str, value: np.ndarray) -> np.ndarray:
  if value.dtype.kind != 'V':
    if value.dtype.kind == 'O':
      raise ValueError(f'{name}: object arrays cannot be saved.')
    return value
  if jnp.issubdtype(value.dtype, jnp.floating):  # bfloat16, float8, ...
    return value.astype(np.float32)
  raise ValueError(f'{name}: dtype {value.dtype} has no numpy equivalent.')


def load_npz(path: str | epath.PathLike) -> Params:
  """Loads a released, Linen or big_vision `.npz` as a params tree in our names.

  Returns:
    Nested dicts of numpy arrays, e.g. `tree['Transformer']['encoderblock_0']
    ['MlpBlock_3']['Dense_0']['kernel']` of shape [D, M].

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: `path` is not a readable .npz archive (wrong format, truncated,
      corrupt, pickled objects) or mixes layouts.
  """
  flat = read_npz(path)
  if QUANTIZED_MARKER in flat:
    raise ValueError(
        f'{path} is an int8 model (vit_jax.tools.quantize), not float params: '
        'pass it to evaluate/predict --checkpoint or benchmark --quantized; '
        'fine-tuning and export need the float checkpoint it came from.')
  return unflatten_params(convert_to_released_layout(flat))


def read_npz(path: str | epath.PathLike) -> dict[str, np.ndarray]:
  """The flat name -> array dict of an `.npz`, as stored (any layout)."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'No checkpoint file at {path}')
  if path.is_dir():
    raise ValueError(f'{path} is a directory, not an .npz file (an Orbax '
                     'checkpoint directory is read with load_params).')
  with path.open('rb') as f:
    magic = f.read(6)
    f.seek(0)
    if not magic.startswith(b'PK'):  # Every .npz is a zip archive.
      raise ValueError(f'{path} is not an .npz checkpoint: {_what_is(magic)}.')
    try:
      with np.load(f, allow_pickle=False) as npz:
        flat = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile,
            zlib.error) as e:
      raise ValueError(
          f'{path} could not be read as an .npz checkpoint; it may be '
          f'truncated or corrupt ({type(e).__name__}: {e}).') from e
  if not flat:
    raise ValueError(f'{path} is an empty .npz archive (no arrays).')
  return flat


def _what_is(magic: bytes) -> str:
  if not magic:
    return 'the file is empty'
  if magic.startswith(b'\x93NUMPY'):
    return 'it is a single .npy array, not an .npz archive of named arrays'
  return f'it does not start with the zip signature (first bytes {magic!r})'
