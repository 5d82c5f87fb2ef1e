"""Transforms against torchvision (the reference DINOv2/OpenCLIP use) and the recipe's statistics."""

import numpy as np
from PIL import Image
import pytest
import torch
from torchvision import transforms as tvt
from torchvision.transforms import functional as tvf

from vitreg_jax.data import embedded
from vitreg_jax.data import transforms as T

torch.set_num_threads(1)


def _planar(seed, size=(3, 40, 56)):
  return np.random.default_rng(seed).random(size, dtype=np.float32)


def _tv(x):
  return torch.from_numpy(x.copy())


@pytest.mark.parametrize('factor', [0.6, 1.0, 1.37])
def test_brightness_contrast_saturation_match_torchvision(factor):
  x = _planar(0)
  for ours, theirs in ((T.adjust_brightness_, tvf.adjust_brightness),
                       (T.adjust_contrast_, tvf.adjust_contrast),
                       (T.adjust_saturation_, tvf.adjust_saturation)):
    y = x.copy()
    ours(y, factor)
    np.testing.assert_allclose(y, theirs(_tv(x), factor).numpy(), atol=2e-6, err_msg=ours.__name__)


@pytest.mark.parametrize('shift', [-0.1, -0.037, 0.0, 0.05, 0.1, 0.5])
def test_hue_matches_torchvision(shift):
  x = _planar(1)
  x[:, :4, :4] = 0.5  # grey pixels (zero chroma)
  x[0, 4:8, :4] = x[1, 4:8, :4]  # ties between max channels
  y = x.copy()
  T.adjust_hue_(y, shift)
  np.testing.assert_allclose(y, tvf.adjust_hue(_tv(x), shift).numpy(), atol=3e-6)


def test_grayscale_solarize_blur_match_torchvision():
  x = _planar(2)
  y = x.copy()
  T.to_grayscale_(y)
  np.testing.assert_allclose(y, tvf.rgb_to_grayscale(_tv(x), 3).numpy(), atol=1e-6)
  y = x.copy()
  T.solarize_(y)
  np.testing.assert_allclose(y, tvf.solarize(_tv(x), 128 / 255).numpy(), atol=1e-7)
  for sigma in (0.1, 0.7, 2.0):
    y = x.copy()
    T.gaussian_blur_(y, sigma)
    expected = tvf.gaussian_blur(_tv(x), [9, 9], [sigma, sigma]).numpy()
    np.testing.assert_allclose(y, expected, atol=2e-6, err_msg=f'sigma {sigma}')


def test_crop_resize_matches_torchvision_resized_crop():
  image = Image.fromarray(embedded.render(embedded.EmbeddedConfig(image_size=90), 'train', 3)['image'])
  for box in ((0, 0, 90, 90), (10, 23, 41, 60), (50, 7, 17, 13)):
    ours = T.crop_resize(image, box, 32)
    theirs = np.asarray(tvf.resized_crop(image, *box, [32, 32], tvt.InterpolationMode.BICUBIC))
    np.testing.assert_array_equal(ours, theirs)


def test_random_resized_crop_box_ranges_and_fallback():
  rng = np.random.default_rng(0)
  height, width = 60, 80
  areas, ratios = [], []
  for _ in range(2000):
    top, left, h, w = T.random_resized_crop_box(rng.random(40), height, width, (0.05, 0.32))
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    areas.append(h * w / (height * width))
    ratios.append(w / h)
  # Integer rounding of w and h moves area and ratio slightly past the bounds.
  assert 0.04 <= min(areas) and max(areas) <= 0.34
  assert 0.7 <= min(ratios) and max(ratios) <= 1.45
  assert abs(np.mean(areas) - np.mean([0.05, 0.32])) < 0.02
  # A 300x2 image never fits the ratio range: both implementations fall back to
  # the same central crop (torchvision's is then deterministic).
  theirs = tvt.RandomResizedCrop.get_params(Image.new('RGB', (300, 2)), (0.9, 1.0), (3 / 4, 4 / 3))
  assert T.random_resized_crop_box(rng.random(40), 2, 300, (0.9, 1.0)) == tuple(theirs)


@pytest.mark.parametrize('size', [(300, 200), (211, 389), (256, 256)])
def test_eval_center_crop_matches_torchvision(size):
  rng = np.random.default_rng(3)
  pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
  ours = T.EvalCenterCrop(resize_size=256, crop_size=224).map({'image': pixels})['image']
  reference = tvt.Compose([tvt.Resize(256, interpolation=tvt.InterpolationMode.BICUBIC),
                           tvt.CenterCrop(224), tvt.ToTensor(),
                           tvt.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)])
  theirs = reference(Image.fromarray(pixels)).permute(1, 2, 0).numpy()
  np.testing.assert_allclose(ours, theirs, atol=2e-6)


def test_eval_native_pads_to_patch_multiple_and_scales_boxes():
  pixels = np.full((45, 61, 3), 200, np.uint8)
  out = T.EvalNative(patch_size=14).map({'image': pixels, 'boxes': np.array([[0.5, 0.0, 1.0, 0.5]])})
  assert out['image'].shape == (56, 70, 3)
  assert np.all(out['image'][45:] == 0) and np.all(out['image'][:, 61:] == 0)
  np.testing.assert_allclose(out['image'][0, 0], (200 / 255 - np.array(T.IMAGENET_MEAN)) / T.IMAGENET_STD,
                             rtol=1e-6)
  np.testing.assert_array_equal(out['size'], (45, 61))
  np.testing.assert_allclose(out['boxes'], [[30.5, 0, 61, 22.5]])


def _denormalize(x):
  return x * np.array(T.IMAGENET_STD, np.float32) + np.array(T.IMAGENET_MEAN, np.float32)


def test_multicrop_reference_shapes_dtypes_ranges():
  image = embedded.render(embedded.EmbeddedConfig(image_size=160), 'train', 0)
  image['skipped'] = 2
  out = T.DinoMultiCrop().random_map(image, np.random.default_rng(0))
  assert out['global_crops'].shape == (2, 224, 224, 3) and out['global_crops'].dtype == np.float32
  assert out['local_crops'].shape == (8, 96, 96, 3) and out['local_crops'].dtype == np.float32
  assert out['label'] == image['label'] and out['skipped'] == 2
  for crops in (out['global_crops'], out['local_crops']):
    pixels = _denormalize(crops)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert pixels.std() > 0.05  # not blank


def _crops_of(transform, images, seed):
  """(global crops [n, 2, ...], local crops [n, L, ...]), the same generator per image."""
  out = [transform.random_map({'image': image}, np.random.Generator(np.random.Philox(seed + i)))
         for i, image in enumerate(images)]
  return tuple(np.stack([o[key] for o in out]) for key in ('global_crops', 'local_crops'))


def _differ(a, b):
  """Per crop position [global 1, global 2, locals...]: fraction of images whose crop differs."""
  return np.concatenate([np.any(x != y, axis=(2, 3, 4)).mean(axis=0) for x, y in zip(a, b)])


@pytest.fixture(scope='module')
def stat_images():
  config = embedded.EmbeddedConfig(image_size=40)
  return [embedded.render(config, 'train', i)['image'] for i in range(300)]


def test_multicrop_augmentation_statistics(stat_images):
  """Each augmentation's frequency, measured by its effect on the output crops."""
  small = dict(global_crops_size=24, local_crops_size=16, local_crops_number=2)
  base = _crops_of(T.DinoMultiCrop(**small), stat_images, 0)
  n = len(stat_images)
  tolerance = lambda p: 4 * np.sqrt(p * (1 - p) / n) + 0.02

  def changed(**override):
    return _differ(_crops_of(T.DinoMultiCrop(**{**small, **override}), stat_images, 0), base)

  # Grayscale: all channels equal (jitter never makes a colourful crop exactly grey).
  gray = np.mean([np.all(np.abs(p - p[..., :1]) < 1e-5, axis=(2, 3, 4)).mean()
                  for p in map(_denormalize, base)])
  assert abs(gray - 0.2) < tolerance(0.2), gray
  # As-trained blur: global 1 never, global 2 p .9, locals p .5 (sigma near 0.1
  # leaves a crop unchanged in float32, hence the one-sided slack).
  blurred = changed(blur_probs=(0.0, 0.0, 0.0))
  for position, p in enumerate((0.0, 0.9, 0.5, 0.5)):
    assert p - tolerance(p) - 0.03 < blurred[position] <= p + tolerance(p), (position, blurred)
  intended = _crops_of(T.DinoMultiCrop(**small, blur_probs='intended'), stat_images, 0)
  no_blur = _crops_of(T.DinoMultiCrop(**small, blur_probs=(0.0, 0.0, 0.0)), stat_images, 0)
  blurred = _differ(intended, no_blur)
  for position, p in enumerate((1.0, 0.1, 0.5, 0.5)):
    assert p - tolerance(p) - 0.03 < blurred[position] <= p + tolerance(p), (position, blurred)
  # Solarisation only on global crop 2, p .2; measured on images bright enough
  # (without jitter) that solarising always changes some pixel.
  bright = [np.maximum(image, 170) for image in stat_images]
  plain = dict(small, color_jitter_prob=0.0, grayscale_prob=0.0)
  solarized = _differ(_crops_of(T.DinoMultiCrop(**plain), bright, 0),
                      _crops_of(T.DinoMultiCrop(**plain, solarize_prob=0.0), bright, 0))
  assert solarized[0] == 0 and np.all(solarized[2:] == 0)
  assert abs(solarized[1] - 0.2) < tolerance(0.2), solarized
  # Colour jitter p .8 and flips p .5 on every crop.
  for override, p in ((dict(color_jitter_prob=0.0), 0.8), (dict(flip_prob=0.0), 0.5)):
    rates = changed(**override)
    assert np.all(np.abs(rates - p) < tolerance(p)), (override, rates)


def test_multicrop_rejects_bad_settings():
  with pytest.raises(ValueError, match='blur_probs'):
    T.DinoMultiCrop(blur_probs='upstream')
  with pytest.raises(ValueError, match='local_crops_scale'):
    T.DinoMultiCrop(local_crops_scale=(0.5, 0.1))


def test_small_image_is_upsampled_not_rejected():
  out = T.DinoMultiCrop(global_crops_size=32, local_crops_size=16, local_crops_number=1).random_map(
      {'image': np.full((3, 2, 3), 90, np.uint8)}, np.random.default_rng(0))
  assert out['global_crops'].shape == (2, 32, 32, 3) and np.isfinite(out['global_crops']).all()
