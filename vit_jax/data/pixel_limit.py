"""A pixel limit on images from outside, checked from the file header alone.

A PNG of one colour at 20000x20000 is a few kilobytes on disk and 1.2 GB once
decoded (a decompression bomb). Every image read from a path the user gives
(image-folder datasets, the tools' image arguments) is measured here first:
its width and height come from the header bytes of its format, no pixel is
decoded, and an image over the limit is refused naming its size and the
setting that raises the limit.

The dimensions are parsed here rather than by Pillow: `PIL.Image.open` runs
Pillow's own bomb check (a warning, then an error at twice its global
`MAX_IMAGE_PIXELS`) before it returns the size, which would pre-empt this
message and tie the limit to a process-wide setting. The formats are the ones
TensorFlow's `decode_image` reads: PNG, JPEG, GIF, BMP and WebP. JPEG XL,
which it also reads, is refused: its size header is not parsed here. A file of
another or damaged format is left to the decoder, which names the problem.

No TensorFlow here (vit_jax.data.checks imports the default).
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from etils import epath

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
_PNG = b'\x89PNG\r\n\x1a\n'
_JPEG_XL = (b'\xff\x0a', b'\x00\x00\x00\x0cJXL \r\n\x87\n')
# JPEG start-of-frame markers (they hold the size); C4, C8 and CC are not.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ImageTooLarge(ValueError):
  """An image whose header claims more pixels than the limit allows."""


def check_pixel_limit(path: str | epath.PathLike, max_pixels: int,
                      setting: str) -> None:
  """Raises ImageTooLarge if the image at `path` has over `max_pixels` pixels.

  Args:
    path: the image file; only its header is read.
    max_pixels: the most width x height allowed.
    setting: where the user raises the limit, for the message
      (`config.input.max_image_pixels`, `--max_image_pixels`).

  Raises:
    ImageTooLarge: over the limit, or a JPEG XL file (size not checkable).
  """
  with epath.Path(path).open('rb') as f:
    head = f.read(32)
    if head.startswith(_JPEG_XL):
      raise ImageTooLarge(f'image {path} is JPEG XL, whose size is not checked '
                          'before decoding; convert it to PNG or JPEG.')
    size = _dimensions(head, f)
  if size is None or size[0] * size[1] <= max_pixels:
    return
  width, height = size
  raise ImageTooLarge(
      f'image {path} is {width}x{height} ({width * height / 1e6:.1f} '
      f'megapixels), over the limit of {max_pixels / 1e6:.1f} megapixels '
      f'({setting}; raise it if the image is trusted)')


def image_dimensions(path: str | epath.PathLike) -> tuple[int, int] | None:
  """(width, height) from the header, or None for a format not read here."""
  with epath.Path(path).open('rb') as f:
    return _dimensions(f.read(32), f)


def _dimensions(head: bytes, f: BinaryIO) -> tuple[int, int] | None:
  """(width, height) of a PNG, GIF, BMP, WebP or JPEG; `head` is its first
  32 bytes, `f` the open file (JPEG headers lie further in)."""
  if head.startswith(_PNG) and head[12:16] == b'IHDR':  # The first chunk.
    return struct.unpack('>II', head[16:24])
  if head[:6] in (b'GIF87a', b'GIF89a') and len(head) >= 10:
    return struct.unpack('<HH', head[6:10])  # The logical screen.
  if head[:2] == b'BM' and len(head) >= 26:
    if struct.unpack('<I', head[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER.
      return struct.unpack('<HH', head[18:22])
    width, height = struct.unpack('<ii', head[18:26])  # Height < 0: top-down.
    return abs(width), abs(height)
  if head[:4] == b'RIFF' and head[8:12] == b'WEBP' and len(head) >= 30:
    return _webp_dimensions(head)
  if head[:3] == b'\xff\xd8\xff':
    return _jpeg_dimensions(f)
  return None


def _webp_dimensions(head: bytes) -> tuple[int, int] | None:
  chunk = head[12:16]
  if chunk == b'VP8X':  # Extended: the canvas, 24-bit sizes minus one.
    return (int.from_bytes(head[24:27], 'little') + 1,
            int.from_bytes(head[27:30], 'little') + 1)
  if chunk == b'VP8L' and head[20] == 0x2F:  # Lossless: 14-bit sizes minus one.
    bits = int.from_bytes(head[21:25], 'little')
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
  if chunk == b'VP8 ' and head[23:26] == b'\x9d\x01\x2a':  # Lossy key frame.
    width, height = struct.unpack('<HH', head[26:30])
    return width & 0x3FFF, height & 0x3FFF
  return None


def _jpeg_dimensions(f: BinaryIO) -> tuple[int, int] | None:
  """Walks the marker segments after SOI to the first start-of-frame."""
  f.seek(2)
  while True:
    if f.read(1) != b'\xff':
      return None
    marker = f.read(1)
    while marker == b'\xff':  # Fill bytes.
      marker = f.read(1)
    if not marker or marker[0] in (0xD9, 0xDA):  # EOF, EOI, scan: no frame.
      return None
    if marker[0] == 0x01 or 0xD0 <= marker[0] <= 0xD7:  # No length field.
      continue
    length = f.read(2)
    if len(length) < 2 or struct.unpack('>H', length)[0] < 2:
      return None
    if marker[0] in _JPEG_SOF:
      frame = f.read(5)  # Precision, height, width.
      if len(frame) < 5:
        return None
      _, height, width = struct.unpack('>BHH', frame)
      return width, height
    f.seek(struct.unpack('>H', length)[0] - 2, 1)
