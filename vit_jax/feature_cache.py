"""Features of a split cached on disk, keyed by everything that made them.

`python -m vit_jax.tools.linear_probe` sweeps shots and l2 values over the same
features; computing them is the whole cost (the backbone over a split), so
they are written once per (checkpoint, dataset, split, preprocessing, model)
and read back when every part of that key matches. A file is an uncompressed
`.npz` of three arrays: `features` float32 [N, D], `labels` int64 [N] and
`key`, the key's canonical JSON as uint8 bytes (no pickle anywhere). Reading
checks the zip signature, the array names, dtypes and shapes, that the
features are finite and that the stored key is the asked one; a file that
fails any check is reported (the caller warns and recomputes), never used.
"""

import hashlib
import io
import json
import os
import zipfile
from typing import Any

from etils import epath
import numpy as np

_NAMES = {'features.npy', 'labels.npy', 'key.npy'}
_ZIP_MAGIC = b'PK\x03\x04'


class CacheMismatch(ValueError):
  """A cache file that cannot be used: damaged, or made under another key."""


def canonical(key: dict[str, Any]) -> str:
  return json.dumps(key, sort_keys=True, separators=(',', ':'))


def cache_path(cache_dir: str, key: dict[str, Any]) -> epath.Path:
  """`cache_dir/<split>-<16 hex digits of the key's hash>.npz`."""
  digest = hashlib.sha256(canonical(key).encode()).hexdigest()[:16]
  split = ''.join(c if c.isalnum() else '_' for c in str(key.get('split', '')))
  return epath.Path(cache_dir) / f'{split}-{digest}.npz'


def file_digest(path: str) -> str:
  """sha256 of a file's bytes (or of a directory's files, sorted by name)."""
  h = hashlib.sha256()
  path = epath.Path(path)
  files = sorted(p for p in path.rglob('*') if p.is_file()) if path.is_dir() else [path]
  for f in files:
    h.update(str(f.relative_to(path) if path.is_dir() else '').encode())
    with f.open('rb') as stream:
      for block in iter(lambda: stream.read(1 << 20), b''):
        h.update(block)
  return h.hexdigest()


def save(path: epath.Path, key: dict[str, Any], features: np.ndarray,
         labels: np.ndarray) -> None:
  """Writes the cache file atomically (a temporary file, then a rename)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  np.savez(buffer, features=np.asarray(features, np.float32),
           labels=np.asarray(labels, np.int64),
           key=np.frombuffer(canonical(key).encode(), np.uint8))
  tmp = path.parent / f'.{path.name}.tmp-{os.getpid()}'
  tmp.write_bytes(buffer.getvalue())
  tmp.replace(path)  # Over a damaged or stale file.


def load(path: epath.Path, key: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """(features, labels) of a cache file made under `key`.

  Raises:
    FileNotFoundError: no file at `path`.
    CacheMismatch: the file is damaged or was made under another key (says which).
  """
  raw = path.read_bytes()
  if not raw.startswith(_ZIP_MAGIC):
    raise CacheMismatch(f'{path} is not an .npz (no zip signature)')
  try:
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
      names = set(archive.namelist())
      if names != _NAMES:
        raise CacheMismatch(f'{path} holds {sorted(names)}, not {sorted(_NAMES)}')
    with np.load(io.BytesIO(raw), allow_pickle=False) as arrays:
      features, labels, stored = (arrays[n] for n in ('features', 'labels', 'key'))
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    if isinstance(e, CacheMismatch):
      raise
    raise CacheMismatch(f'{path} is damaged ({type(e).__name__}: {e})') from None
  if stored.dtype != np.uint8 or stored.ndim != 1:
    raise CacheMismatch(f'{path}: its key is {stored.dtype} {stored.shape}')
  if bytes(stored) != canonical(key).encode():
    raise CacheMismatch(f'{path} was made under another key: '
                        f'{_key_difference(bytes(stored), key)}')
  if (features.dtype != np.float32 or features.ndim != 2 or labels.dtype != np.int64
      or labels.shape != features.shape[:1]):
    raise CacheMismatch(
        f'{path}: features {features.dtype} {features.shape} and labels '
        f'{labels.dtype} {labels.shape} (want float32 [N, D], int64 [N])')
  if not np.all(np.isfinite(features)):
    raise CacheMismatch(f'{path}: features hold NaN or Inf')
  return features, labels


def _key_difference(stored: bytes, key: dict[str, Any]) -> str:
  try:
    old = json.loads(stored.decode())
  except (UnicodeDecodeError, json.JSONDecodeError):
    return 'its key does not parse'
  if not isinstance(old, dict):
    return 'its key is not a mapping'
  changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
  return ', '.join(changed) + ' differ'
