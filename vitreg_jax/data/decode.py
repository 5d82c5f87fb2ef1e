"""Robust image decoding, and a grain dataset that never crashes on a bad file.

Real image collections hold grayscale, palette, RGBA, CMYK, 16-bit and
EXIF-rotated files, and a few truncated or non-image ones. :func:`decode_image`
turns all readable ones into uint8 RGB; :class:`DecodedDataset` catches the
unreadable ones:

* training (``on_error='substitute'``): the record is skipped and the next
  candidate taken from far along the same (shuffled, repeated) stream; each
  output carries ``skipped`` = how many files were skipped to produce it, so
  the sum over a batch is the count the training metrics report. Batch shapes
  and exact resumption are unaffected.
* evaluation (``on_error='invalid'``): the record is kept with a blank image and
  ``valid = 0``, so metrics can exclude it without changing the example count.
"""

import io
import os

from absl import logging
import grain
import numpy as np
from PIL import Image
from PIL import ImageOps

# A prime far larger than a batch, so a substitute rarely lands in the same batch.
_FALLBACK_STRIDE = 7919
_EXIF_ORIENTATION = 0x0112


class DecodeError(ValueError):
  """An image that cannot be decoded (corrupt, truncated, unsupported)."""


def _alpha_over_white(rgba: Image.Image) -> np.ndarray:
  """Composites on white: transparent pixels often hold arbitrary colours."""
  background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
  return np.asarray(Image.alpha_composite(background, rgba).convert('RGB'))


def _wide_to_uint8(array: np.ndarray) -> np.ndarray:
  """16/32-bit integer or float samples to uint8, keeping the full range visible."""
  if array.dtype == np.bool_:
    return array.astype(np.uint8) * 255
  if np.issubdtype(array.dtype, np.floating):
    array = np.nan_to_num(array.astype(np.float32))
    scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
    return np.clip(array * scale + 0.5, 0, 255).astype(np.uint8)
  if array.dtype == np.uint8:
    return array
  # 16-bit files (and PIL's 32-bit 'I' mode holding them) use 0..65535.
  peak = 65535.0 if array.max(initial=0) > 255 else 255.0
  return np.clip(array.astype(np.float32) * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
  mode = image.mode
  if mode == 'RGB':
    return np.asarray(image)
  if mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (mode == 'P' and 'transparency' in image.info):
    return _alpha_over_white(image.convert('RGBA'))
  if mode.startswith('I') or mode == 'F':
    gray = _wide_to_uint8(np.asarray(image))
    return np.repeat(gray[..., None], 3, axis=-1)
  return np.asarray(image.convert('RGB'))  # L, 1, P, CMYK, YCbCr, LAB, HSV


def array_to_rgb(array: np.ndarray) -> np.ndarray:
  """An in-memory image ([H, W], [H, W, 1|3|4], any numeric dtype) as uint8 RGB."""
  array = np.asarray(array)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
    raise DecodeError(f'image array has shape {array.shape}; expected [H, W] or [H, W, 1|3|4]')
  array = _wide_to_uint8(array)
  if array.shape[-1] == 4:
    return _alpha_over_white(Image.fromarray(array, 'RGBA'))
  if array.shape[-1] == 1:
    return np.repeat(array, 3, axis=-1)
  return array


def decode_image(data) -> np.ndarray:
  """Encoded bytes, a file path or an array -> uint8 RGB [H, W, 3], EXIF orientation applied.

  Raises:
    DecodeError: the data is not a readable image (the cause is chained).
  """
  if isinstance(data, np.ndarray) and data.dtype != np.object_ and data.ndim >= 2:
    return array_to_rgb(data)
  if isinstance(data, np.ndarray):  # a 0-d bytes array, as some readers return
    data = data.item()
  try:
    if isinstance(data, (str, os.PathLike)):
      opened = Image.open(data)
    elif isinstance(data, (bytes, bytearray, memoryview)):
      opened = Image.open(io.BytesIO(data))
    else:
      raise DecodeError(f'cannot decode an image from {type(data).__name__}')
    with opened as image:
      image.load()  # decode now, inside the try, not lazily later
      if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
      return _pil_to_rgb(image)
  except DecodeError:
    raise
  except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
          TypeError, KeyError, IndexError) as e:
    raise DecodeError(f'{type(e).__name__}: {e}') from e


def _describe(record) -> str:
  image = record.get('image')
  if isinstance(image, (str, os.PathLike)):
    return f'file {image}'
  return f'record {record.get("index", "?")}'


class DecodedDataset(grain.MapDataset):
  """Decodes ``record['image']``; see the module docstring for the error policy."""

  def __init__(self, parent: grain.MapDataset, *, on_error: str = 'substitute', max_attempts: int = 16):
    super().__init__(parent)
    if on_error not in ('substitute', 'invalid'):
      raise ValueError(f"on_error must be 'substitute' or 'invalid', got {on_error!r}")
    self._on_error = on_error
    self._max_attempts = max_attempts

  def __len__(self):
    return len(self._parent)

  def __str__(self):
    return f'DecodedDataset(on_error={self._on_error})'

  def _candidate(self, index: int, attempt: int) -> int:
    candidate = index + attempt * _FALLBACK_STRIDE
    length = len(self._parent)
    return candidate % length if length < np.iinfo(np.int64).max // 2 else candidate

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    attempts = self._max_attempts if self._on_error == 'substitute' else 1
    errors = []
    for attempt in range(attempts):
      record = self._parent[self._candidate(index, attempt)]
      try:
        image = decode_image(record['image'])
      except DecodeError as e:
        logging.warning('skipping undecodable %s: %s', _describe(record), e)
        errors.append(f'{_describe(record)}: {e}')
        continue
      out = dict(record)
      out['image'] = image
      out['skipped'] = attempt
      out['valid'] = int(record.get('valid', 1))  # padding records arrive with valid = 0
      return out
    if self._on_error == 'invalid':
      out = dict(record)
      out['image'] = np.zeros((16, 16, 3), np.uint8)
      out['skipped'] = 1
      out['valid'] = 0
      return out
    raise RuntimeError(f'{attempts} candidate records in a row failed to decode near stream index '
                       f'{index}; the data is probably broken. Errors: ' + '; '.join(errors))
