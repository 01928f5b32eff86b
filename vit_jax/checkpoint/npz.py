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

import contextlib
import math
import uuid
import zipfile
import zlib
from collections.abc import Collection, Iterator, Mapping
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
# A zip archive starts with a local file header, or is empty (end record).
_ZIP_SIGNATURES = (b'PK\x03\x04', b'PK\x05\x06')
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}
_CORRUPT_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile,
                   zlib.error)


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


def read_npz(path: str | epath.PathLike,
             names: Collection[str] | None = None) -> dict[str, np.ndarray]:
  """The flat name -> array dict of an `.npz`, as stored (any layout).

  Every member's `.npy` header is checked before any array is read
  (`array_headers`), so a pickled array is refused without unpickling it and
  a header that claims more bytes than the member holds is refused before
  anything is allocated.

  Args:
    path: the file.
    names: read only these arrays (those present); default: all.

  Raises:
    FileNotFoundError: nothing at `path`.
    ValueError: naming the file: not a zip archive, a member that is not a
      numeric `.npy` array ("contains pickled objects, refused" for object
      arrays), or a truncated or corrupt archive.
  """
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'No checkpoint file at {path}')
  if path.is_dir():
    raise ValueError(f'{path} is a directory, not an .npz file (an Orbax '
                     'checkpoint directory is read with load_params).')
  with path.open('rb') as f:
    magic = f.read(6)
    f.seek(0)
    if not magic.startswith(_ZIP_SIGNATURES):  # Every .npz is a zip archive.
      raise ValueError(f'{path} is not an .npz checkpoint: {_what_is(magic)}.')
    with _as_corrupt(path):
      archive = zipfile.ZipFile(f)
    with archive:
      headers = array_headers(archive, path)
    if not headers:
      raise ValueError(f'{path} is an empty .npz archive (no arrays).')
    f.seek(0)
    with _as_corrupt(path), np.load(f, allow_pickle=False) as npz:
      return {name: npz[name] for name in headers
              if names is None or name in names}


def array_headers(archive: zipfile.ZipFile, path: str | epath.PathLike
                  ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """name -> (shape, dtype) of every array of an open `.npz`, from the `.npy`
  headers alone (no array data is read, nothing is unpickled).

  Raises:
    ValueError: naming `path` and the member: not a `.npy` array, an object
      (pickled) dtype, a name given twice, or a stated shape and dtype that
      are not the bytes the member holds.
  """
  headers = {}
  for info in archive.infolist():
    if not info.filename.endswith('.npy'):
      raise ValueError(f'{path} holds {info.filename!r}, which is not a .npy '
                       'array; an .npz checkpoint holds only arrays.')
    name = info.filename[:-len('.npy')]
    if name in headers:
      raise ValueError(f'{path} holds the array {name!r} twice.')
    with _as_corrupt(path), archive.open(info) as member:
      version = np.lib.format.read_magic(member)
      reader = _NPY_HEADER_READERS.get(version)
      if reader is not None:
        shape, _, dtype = reader(member)
        data_bytes = info.file_size - member.tell()
    if reader is None:
      raise ValueError(f'{path}: array {name!r} is in .npy format {version}; '
                       f'read are {sorted(_NPY_HEADER_READERS)}.')
    if dtype.hasobject:
      raise ValueError(
          f'{path} contains pickled objects, refused: array {name!r} has '
          f'dtype {dtype} (Python objects); a checkpoint holds numeric arrays '
          'only, and nothing of it was unpickled.')
    want = math.prod(shape) * dtype.itemsize
    if data_bytes != want:
      raise ValueError(
          f'{path}: array {name!r} claims shape {shape} {dtype} ({want} bytes) '
          f'but holds {data_bytes}; the file is truncated or corrupt.')
    headers[name] = (tuple(shape), dtype)
  return headers


@contextlib.contextmanager
def _as_corrupt(path: epath.Path) -> Iterator[None]:
  """Low-level read errors of the archive as a ValueError naming `path`."""
  try:
    yield
  except _CORRUPT_ERRORS as e:
    raise ValueError(
        f'{path} could not be read as an .npz checkpoint; it may be '
        f'truncated or corrupt ({type(e).__name__}: {e}).') from e


def _what_is(magic: bytes) -> str:
  if not magic:
    return 'the file is empty'
  if magic.startswith(b'\x93NUMPY'):
    return 'it is a single .npy array, not an .npz archive of named arrays'
  return f'it does not start with the zip signature (first bytes {magic!r})'
