"""Decoding of odd and broken files: converted correctly, or skipped and counted."""

import io

import grain
import numpy as np
from PIL import Image
import pytest

from vitreg_jax.data import decode


def _encode(image, fmt, **kwargs):
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def test_rgb_and_grayscale_and_palette():
  rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
  np.testing.assert_array_equal(decode.decode_image(_encode(Image.fromarray(rgb), 'PNG')), rgb)
  gray = rgb[..., 0]
  out = decode.decode_image(_encode(Image.fromarray(gray), 'PNG'))
  assert out.shape == (7, 5, 3) and np.all(out == gray[..., None])
  palette = Image.fromarray(rgb).quantize(8)
  np.testing.assert_array_equal(decode.decode_image(_encode(palette, 'PNG')),
                                np.asarray(palette.convert('RGB')))


def test_alpha_is_composited_on_white():
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., 0] = 200  # red under the alpha
  rgba[:2, :, 3] = 255  # top half opaque, bottom fully transparent
  rgba[2:, :, 1] = 77  # arbitrary colour hidden by transparency
  out = decode.decode_image(_encode(Image.fromarray(rgba, 'RGBA'), 'PNG'))
  np.testing.assert_array_equal(out[:2], np.broadcast_to([200, 0, 0], (2, 4, 3)))
  np.testing.assert_array_equal(out[2:], np.full((2, 4, 3), 255))
  # A palette PNG with a transparent index behaves the same.
  palette = Image.new('P', (3, 3), 1)
  palette.putpalette([0, 0, 255, 10, 200, 10] + [0] * 762)
  palette.putpixel((0, 0), 0)
  out = decode.decode_image(_encode(palette, 'PNG', transparency=0))
  assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (10, 200, 10)


def test_cmyk_jpeg():
  cmyk = Image.new('CMYK', (8, 6), (0, 255, 255, 0))  # pure red in CMYK
  out = decode.decode_image(_encode(cmyk, 'JPEG', quality=95))
  assert out.shape == (6, 8, 3)
  assert out[..., 0].mean() > 230 and out[..., 1:].mean() < 25


def test_16_bit_png_keeps_full_range():
  values = np.array([[0, 257 * 128, 65535]], np.uint16)
  out = decode.decode_image(_encode(Image.fromarray(values), 'PNG'))
  np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])
  np.testing.assert_array_equal(decode.array_to_rgb(values.astype(np.uint16))[0, :, 1], [0, 128, 255])


def test_exif_orientation_is_applied():
  pixels = np.zeros((10, 20, 3), np.uint8)
  pixels[0, 0] = 255  # a white top-left corner in the stored (landscape) pixels
  image = Image.fromarray(pixels)
  exif = image.getexif()
  exif[0x0112] = 6  # display rotated 90 degrees clockwise
  out = decode.decode_image(_encode(image, 'PNG', exif=exif.tobytes()))
  assert out.shape == (20, 10, 3)
  assert out[0, -1].min() == 255  # the stored top-left is now the top-right


def test_arrays_of_any_layout():
  assert decode.decode_image(np.zeros((3, 4), np.float32)).shape == (3, 4, 3)
  np.testing.assert_array_equal(decode.decode_image(np.ones((2, 2, 1), np.float32))[..., 2], 255)
  with pytest.raises(decode.DecodeError, match='shape'):
    decode.decode_image(np.zeros((3, 4, 5), np.uint8))


@pytest.mark.parametrize('data', [
    b'not an image at all',
    _encode(Image.new('RGB', (64, 64), (1, 2, 3)), 'JPEG')[:200],  # truncated
    '/nonexistent/file.jpg',
    12345,
])
def test_undecodable_raises_decode_error(data):
  with pytest.raises(decode.DecodeError):
    decode.decode_image(data)


def _records(broken):
  good = lambda i: _encode(Image.new('RGB', (4, 4), (i * 20, 0, 0)), 'PNG')
  return [{'image': b'garbage' if i in broken else good(i), 'index': i} for i in range(10)]


def test_training_substitutes_and_counts():
  records = _records({2, 5})
  out = [decode.DecodedDataset(grain.MapDataset.source(records))[i] for i in range(10)]
  assert [o['skipped'] for o in out] == [0, 0, 1, 0, 0, 1, 0, 0, 0, 0]
  # The substitute is a real, different record (here 2 + 7919 = 1 and 5 + 7919 = 4 mod 10).
  assert out[2]['index'] == 1 and out[5]['index'] == 4
  assert out[2]['image'][0, 0, 0] == 20


def test_training_gives_up_with_a_clear_error_when_everything_is_broken():
  records = _records(set(range(10)))
  with pytest.raises(RuntimeError, match='failed to decode'):
    decode.DecodedDataset(grain.MapDataset.source(records), max_attempts=3)[0]


def test_evaluation_keeps_position_and_flags_invalid():
  records = _records({3})
  out = [decode.DecodedDataset(grain.MapDataset.source(records), on_error='invalid')[i] for i in range(10)]
  assert [o['valid'] for o in out] == [1, 1, 1, 0, 1, 1, 1, 1, 1, 1]
  assert out[3]['index'] == 3 and out[3]['image'].shape[-1] == 3
