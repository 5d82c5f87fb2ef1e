"""DeiT III host augmentation: 3-Augment against torchvision/PIL, Mixup/CutMix against timm."""

import itertools

import grain
import numpy as np
from PIL import Image
from PIL import ImageFilter
import pytest
from timm.data import mixup as timm_mixup
import torch
from torchvision import transforms as tvt
from torchvision.transforms import functional as tvf

from vitreg_jax.data import mixing
from vitreg_jax.data import three_augment as A
from vitreg_jax.data import transforms as T

torch.set_num_threads(1)


def _pixels(seed, height, width):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _denormalize(x):
  return x * np.array(T.IMAGENET_STD, np.float32) + np.array(T.IMAGENET_MEAN, np.float32)


def _uniforms(seed, **columns):
  u = np.random.default_rng(seed).random(A.NUM_UNIFORMS)
  for column, value in columns.items():  # three_augment's own columns, by name
    u[getattr(A, column)] = value
  return u


# ---------------------------------------------------------------------------
# 3-Augment: spatial step


@pytest.mark.parametrize('seed', range(4))
def test_simple_random_crop_matches_torchvision_reflect_random_crop(seed):
  image = Image.fromarray(_pixels(seed, 37, 53))
  size = 24
  reference = tvt.Compose([tvt.Resize(size, interpolation=tvt.InterpolationMode.BICUBIC),
                           tvt.RandomCrop(size, padding=4, padding_mode='reflect')])
  torch.manual_seed(seed)
  theirs = np.asarray(reference(image))
  # The offset torchvision drew: same seed, same padded size (24 + 8) x (34 + 8).
  torch.manual_seed(seed)
  top, left, _, _ = tvt.RandomCrop.get_params(Image.new('RGB', (34 + 8, 24 + 8)), (size, size))
  positions = (24 + 8 - size + 1, 34 + 8 - size + 1)
  ours = A.simple_random_crop(image, size, (top + 0.5) / positions[0], (left + 0.5) / positions[1])
  np.testing.assert_array_equal(ours, theirs)
  # Through the transform: flip with u < 0.5 only.
  augment = A.ThreeAugment(image_size=size, spatial='src')
  u = _uniforms(seed, U_SRC_TOP=(top + 0.5) / positions[0], U_SRC_LEFT=(left + 0.5) / positions[1])
  u[T.U_FLIP] = 0.7
  np.testing.assert_array_equal(augment.spatial_crop(image, u), theirs)
  u[T.U_FLIP] = 0.3
  np.testing.assert_array_equal(augment.spatial_crop(image, u), np.asarray(tvf.hflip(Image.fromarray(theirs))))


def test_simple_random_crop_reflect_padding_by_hand():
  pixels = np.arange(6 * 6 * 3, dtype=np.uint8).reshape(6, 6, 3)
  out = A.simple_random_crop(Image.fromarray(pixels), 6, 0.0, 0.0)  # top-left of the 14 x 14 padding
  assert out.shape == (6, 6, 3)
  # Reflect (no edge repeat): padded rows/cols 0..5 are original 4, 3, 2, 1, 0, 1.
  index = np.array([4, 3, 2, 1, 0, 1])
  np.testing.assert_array_equal(out, pixels[index][:, index])
  out = A.simple_random_crop(Image.fromarray(pixels), 6, 0.999, 0.5)  # last row offset 8, column 4
  np.testing.assert_array_equal(out, pixels[[4, 5, 4, 3, 2, 1]][:, [0, 1, 2, 3, 4, 5]])


@pytest.mark.parametrize('spatial', A.SPATIAL)
def test_three_augment_output_and_passthrough(spatial):
  element = {'image': _pixels(0, 30, 45), 'label': 7, 'index': 3, 'skipped': 1}
  out = A.ThreeAugment(image_size=20, spatial=spatial).random_map(element, np.random.default_rng(0))
  assert set(out) == {'image', 'label', 'index', 'skipped'}
  assert out['image'].shape == (20, 20, 3) and out['image'].dtype == np.float32
  assert out['label'] == 7 and out['label'].dtype == np.int32
  assert out['index'] == 3 and out['skipped'] == 1
  pixels = _denormalize(out['image'])
  assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and pixels.std() > 0.05


# ---------------------------------------------------------------------------
# 3-Augment: exactly one of grayscale / solarize / blur, then jitter


def test_exactly_one_operation_on_a_constant_image():
  """A constant colour identifies the outcome: grey, solarized, or unchanged (blur)."""
  colour = np.array([200, 100, 30], np.float32)
  outcomes = {'grayscale': np.full(3, colour @ T.GRAY_WEIGHTS) / 255,
              'solarize': np.array([55, 100, 30]) / 255, 'blur': colour / 255}
  image = {'image': np.broadcast_to(colour.astype(np.uint8), (30, 41, 3)).copy()}
  counts = dict.fromkeys(outcomes, 0)
  n = 300
  for seed, spatial in zip(range(n), itertools.cycle(A.SPATIAL)):
    augment = A.ThreeAugment(image_size=12, spatial=spatial, color_jitter=0)
    pixels = _denormalize(augment.random_map(image, np.random.default_rng(seed))['image'])
    matches = [name for name, value in outcomes.items() if np.allclose(pixels, value, atol=1e-5)]
    assert len(matches) == 1, (seed, pixels[0, 0])
    counts[matches[0]] += 1
  tolerance = 4 * np.sqrt(2 / 9 / n)
  assert all(abs(c / n - 1 / 3) < tolerance for c in counts.values()), counts


@pytest.mark.parametrize('operations', [(), ('grayscale',), ('solarize', 'blur')])
def test_operations_narrow_the_choice(operations):
  """``operations`` picks among the named ones only; ``()`` leaves the crop's colours."""
  colour = np.array([200, 100, 30], np.float32)
  outcomes = {'grayscale': np.full(3, colour @ T.GRAY_WEIGHTS) / 255,
              'solarize': np.array([55, 100, 30]) / 255, 'blur': colour / 255}
  image = {'image': np.broadcast_to(colour.astype(np.uint8), (30, 41, 3)).copy()}
  augment = A.ThreeAugment(image_size=12, color_jitter=0, operations=operations)
  seen = set()
  for seed in range(60):
    pixels = _denormalize(augment.random_map(image, np.random.default_rng(seed))['image'])
    seen.update(n for n, v in outcomes.items() if np.allclose(pixels, v, atol=1e-5))
  # blur leaves a constant image unchanged, as does no operation at all
  assert seen == (set(operations) or {'blur'})


def _reference_photometric(pixels, operation, sigma, u, strength):
  """torchvision tensor ops in upstream's order: one operation, ColorJitter(b, c, s), Normalize."""
  if operation == 'blur':  # upstream: PIL GaussianBlur(radius=sigma) on the uint8 crop
    pixels = Image.fromarray(np.array(pixels)).filter(ImageFilter.GaussianBlur(radius=sigma))
  x = tvf.to_tensor(np.array(pixels))
  if operation == 'grayscale':
    x = tvf.rgb_to_grayscale(x, 3)
  elif operation == 'solarize':
    x = tvf.solarize(x, 128 / 255)
  adjust = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation)
  order = list(itertools.permutations(range(4)))[int(u[T.U_JITTER_ORDER] * 24)]
  for op in order:
    if op < 3 and strength > 0:
      x = adjust[op](x, 1 - strength + 2 * strength * u[T.U_JITTER_FACTORS][op])
  return tvf.normalize(x, T.IMAGENET_MEAN, T.IMAGENET_STD).permute(1, 2, 0).numpy()


@pytest.mark.parametrize('choice,operation', list(enumerate(A.OPERATIONS)))
@pytest.mark.parametrize('strength', [0.3, 0.0])
def test_photometric_chain_matches_torchvision(choice, operation, strength):
  image = Image.fromarray(_pixels(5, 33, 28))
  augment = A.ThreeAugment(image_size=20, spatial='rrc', color_jitter=strength)
  for seed in range(3):
    u = _uniforms(seed, U_CHOICE=(choice + 0.5) / 3)
    sigma = 0.1 + 1.9 * float(u[T.U_BLUR_SIGMA])  # upstream radius ~ U(0.1, 2)
    expected = _reference_photometric(augment.spatial_crop(image, u), operation, sigma, u, strength)
    np.testing.assert_allclose(augment.augment(image, u), expected, atol=3e-5,
                               err_msg=f'{operation} seed {seed}')


def test_three_augment_is_deterministic_given_the_grain_seed():
  elements = [{'image': _pixels(i, 26, 31), 'label': i} for i in range(4)]
  augment = A.ThreeAugment(image_size=16)

  def images(seed):
    ds = grain.MapDataset.source(elements).random_map(augment, seed=seed)
    return np.stack([ds[i]['image'] for i in range(len(elements))])

  first = images(3)
  np.testing.assert_array_equal(first, images(3))
  assert not np.array_equal(first, images(4))


def test_three_augment_rejects_bad_settings():
  with pytest.raises(ValueError, match=r"spatial must be one of \('src', 'rrc'\)"):
    A.ThreeAugment(spatial='random_crop')
  with pytest.raises(ValueError, match='crop_scale'):
    A.ThreeAugment(crop_scale=(0.5, 0.1))
  with pytest.raises(ValueError, match='color_jitter'):
    A.ThreeAugment(color_jitter=-0.1)
  with pytest.raises(ValueError, match=r"operations must be distinct names from \('grayscale'"):
    A.ThreeAugment(operations=('grayscale', 'sharpen'))


# ---------------------------------------------------------------------------
# Mixup / CutMix: pure functions against timm


@pytest.mark.parametrize('batch', [1, 3, 8])
@pytest.mark.parametrize('lam,smoothing', [(1.0, 0.0), (0.37, 0.0), (0.37, 0.1), (0.0, 0.1)])
def test_mix_targets_matches_timm(batch, lam, smoothing):
  labels = np.random.default_rng(batch).integers(0, 11, batch)
  theirs = timm_mixup.mixup_target(torch.from_numpy(labels), 11, lam, smoothing).numpy()
  ours = mixing.mix_targets(labels.astype(np.int32), 11, lam, smoothing)
  assert ours.dtype == np.float32 and ours.shape == (batch, 11)
  np.testing.assert_allclose(ours, theirs, atol=1e-7)
  np.testing.assert_allclose(ours.sum(1), 1, rtol=1e-6)


# Cut sizes int(H sqrt(1 - lam)) are even here: timm 1.0.15 ends the box at cy + cut // 2,
# timm 1.0.31 at cy + (cut + 1) // 2; both agree on even cuts (odd cuts: the next test).
@pytest.mark.parametrize('lam,height,width,centre', [
    (0.3, 32, 32, (16, 16)), (0.3, 32, 48, (0, 47)), (0.77, 31, 17, (30, 3)), (0.0, 20, 20, (10, 9)),
    (0.0, 22, 20, (0, 0)), (0.999, 24, 24, (5, 5)), (0.52, 7, 9, (6, 8)), (0.62, 224, 224, (200, 13))])
def test_cutmix_box_matches_timm(monkeypatch, lam, height, width, centre):
  """timm draws the centre with np.random.randint(0, H), randint(0, W): feed it ours."""
  assert int(height * np.sqrt(1 - lam)) % 2 == 0 and int(width * np.sqrt(1 - lam)) % 2 == 0
  calls, draws = [], iter(centre)

  def randint(low, high, size=None):
    calls.append((low, high, size))
    return next(draws)

  monkeypatch.setattr(np.random, 'randint', randint)
  theirs_box, theirs_lam = timm_mixup.cutmix_bbox_and_lam((2, 3, height, width), lam)
  assert calls == [(0, height, None), (0, width, None)]  # the centre is uniform over the pixels
  box, corrected = mixing.cutmix_box(lam, height, width, centre)
  assert box == tuple(int(v) for v in theirs_box)
  assert corrected == pytest.approx(theirs_lam, abs=1e-12)
  y0, y1, x0, x1 = box
  assert 0 <= y0 <= y1 <= height and 0 <= x0 <= x1 <= width


def test_cutmix_box_odd_cut_by_hand():
  # lam 0.75 on 10 x 10: cut 5 x 5, rows/cols [c - 2, c + 3), clipped at the borders.
  assert mixing.cutmix_box(0.75, 10, 10, (5, 5)) == ((3, 8, 3, 8), 0.75)
  assert mixing.cutmix_box(0.75, 10, 10, (0, 9)) == ((0, 3, 7, 10), pytest.approx(0.91))
  # 0.51 on 20 x 30: sqrt(0.49) = 0.7, cuts 14 x 21, columns [c - 10, c + 11).
  assert mixing.cutmix_box(0.51, 20, 30, (10, 15)) == ((3, 17, 5, 26), pytest.approx(1 - 14 * 21 / 600))


def test_mixed_images_match_the_formulas():
  rng = np.random.default_rng(0)
  for batch in (1, 3, 4):
    images = rng.random((batch, 6, 5, 3), dtype=np.float32)
    flipped = images[[batch - 1 - i for i in range(batch)]].astype(np.float64)
    np.testing.assert_allclose(mixing.mixup_images(images, 0.3), 0.3 * images + 0.7 * flipped, atol=1e-6)
    box = (1, 4, 2, 5)
    mixed = mixing.cutmix_images(images, box)
    for b, y, x in itertools.product(range(batch), range(6), range(5)):
      inside = 1 <= y < 4 and 2 <= x < 5
      np.testing.assert_array_equal(mixed[b, y, x], (flipped if inside else images)[b, y, x])
  np.testing.assert_allclose(mixing.mixup_images(images[:1], 0.3), images[:1], atol=1e-6)  # itself


# ---------------------------------------------------------------------------
# Mixup / CutMix: the batch transform


def _timm_run(mixer, params_rng, batch, monkeypatch):
  """timm's Mixup fed the same decisions: rand() -> apply/switch, beta() -> lam, the box."""
  u = params_rng.random(mixing.NUM_UNIFORMS)
  lam_mixup = params_rng.beta(mixer.mixup_alpha, mixer.mixup_alpha) if mixer.mixup_alpha else 1.0
  lam_cutmix = params_rng.beta(mixer.cutmix_alpha, mixer.cutmix_alpha) if mixer.cutmix_alpha else 1.0
  height, width = batch['image'].shape[1:3]
  rands = iter([u[mixing.U_APPLY], u[mixing.U_SWITCH]])
  centre = (int(u[mixing.U_CENTRE_Y] * height), int(u[mixing.U_CENTRE_X] * width))
  monkeypatch.setattr(np.random, 'rand', lambda: next(rands))
  # The box geometry is compared above (timm releases differ on odd cut sizes); here timm
  # pastes our box, corrects lam from it and builds the targets.
  monkeypatch.setattr(timm_mixup, 'rand_bbox', lambda shape, lam, margin=0., count=None:
                      mixing.cutmix_box(lam, shape[-2], shape[-1], centre)[0])
  assert mixer.mixup_alpha != mixer.cutmix_alpha  # tells timm's two Beta draws apart
  lams = {mixer.mixup_alpha: lam_mixup, mixer.cutmix_alpha: lam_cutmix}
  monkeypatch.setattr(np.random, 'beta', lambda a, b: lams[a])
  reference = timm_mixup.Mixup(mixup_alpha=mixer.mixup_alpha, cutmix_alpha=mixer.cutmix_alpha,
                               switch_prob=mixer.switch_prob, prob=mixer.prob,
                               label_smoothing=mixer.label_smoothing, num_classes=mixer.num_classes)
  x = torch.from_numpy(batch['image'].transpose(0, 3, 1, 2).copy())
  x, targets = reference(x, torch.from_numpy(batch['label'].astype(np.int64)))
  monkeypatch.undo()
  return x.permute(0, 2, 3, 1).numpy(), targets.numpy()


@pytest.mark.parametrize('settings,modes', [
    (dict(), {'mixup', 'cutmix'}), (dict(mixup_alpha=0.0, label_smoothing=0.1), {'cutmix'}),
    (dict(cutmix_alpha=0.0, label_smoothing=0.0), {'mixup'}),
    (dict(prob=0.5, switch_prob=0.3), {'none', 'mixup', 'cutmix'})])
def test_mixup_cutmix_matches_timm_batch_mode(monkeypatch, settings, modes):
  mixer = mixing.MixupCutmix(num_classes=10, **settings)
  rng = np.random.default_rng(1)
  seen = set()
  for seed in range(12):
    batch = {'image': rng.random((4, 12, 10, 3), dtype=np.float32),
             'label': rng.integers(0, 10, 4).astype(np.int32), 'index': np.arange(4, dtype=np.int32)}
    ours = mixer.random_map(dict(batch), np.random.default_rng(seed))
    seen.add(mixer.mix_params(np.random.default_rng(seed), 12, 10).mode)
    images, targets = _timm_run(mixer, np.random.default_rng(seed), batch, monkeypatch)
    np.testing.assert_allclose(ours['image'], images, atol=1e-6, err_msg=f'seed {seed}')
    np.testing.assert_allclose(ours['targets'], targets, atol=1e-6, err_msg=f'seed {seed}')
    np.testing.assert_array_equal(ours['label'], batch['label'])
    np.testing.assert_array_equal(ours['index'], batch['index'])
  assert seen == modes


def test_mix_decision_statistics():
  n = 4000
  draws = lambda mixer: [mixer.mix_params(np.random.default_rng(s), 32, 32) for s in range(n)]
  params = draws(mixing.MixupCutmix(num_classes=5))
  cutmix = np.mean([p.mode == 'cutmix' for p in params])
  assert abs(cutmix - 0.5) < 4 * np.sqrt(0.25 / n)
  lams = np.array([p.lam for p in params if p.mode == 'mixup'])
  a = 0.8  # Beta(0.8, 0.8): mean 1/2, variance 1 / (4 (2a + 1))
  assert abs(lams.mean() - 0.5) < 0.02 and abs(lams.var() - 1 / (4 * (2 * a + 1))) < 0.01
  applied = np.mean([p.mode != 'none' for p in draws(mixing.MixupCutmix(num_classes=5, prob=0.3))])
  assert abs(applied - 0.3) < 4 * np.sqrt(0.21 / n)
  assert {p.mode for p in draws(mixing.MixupCutmix(num_classes=5, mixup_alpha=0.0))} == {'cutmix'}


def test_no_mixing_mode_gives_smoothed_one_hot_and_keeps_images():
  mixer = mixing.MixupCutmix(num_classes=4, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.2)
  batch = {'image': np.random.default_rng(0).random((3, 4, 4, 3), dtype=np.float32),
           'label': np.array([0, 3, 1], np.int32)}
  out = mixer.random_map(batch, np.random.default_rng(0))
  np.testing.assert_array_equal(out['image'], batch['image'])
  np.testing.assert_allclose(out['targets'], [[0.85, 0.05, 0.05, 0.05], [0.05, 0.05, 0.05, 0.85],
                                              [0.05, 0.85, 0.05, 0.05]], rtol=1e-6)


def test_batch_of_one_and_odd_batches_mix_with_their_mirror():
  mixer = mixing.MixupCutmix(num_classes=3, cutmix_alpha=0.0)
  one = {'image': np.full((1, 4, 4, 3), 0.25, np.float32), 'label': np.array([2], np.int32)}
  out = mixer.random_map(one, np.random.default_rng(0))
  np.testing.assert_allclose(out['image'], one['image'], atol=1e-7)
  np.testing.assert_allclose(out['targets'], [[0.1 / 3, 0.1 / 3, 1 - 0.1 + 0.1 / 3]], rtol=1e-6)
  odd = {'image': np.random.default_rng(1).random((5, 4, 4, 3), dtype=np.float32),
         'label': np.arange(5, dtype=np.int32) % 3}
  out = mixer.random_map(odd, np.random.default_rng(0))
  np.testing.assert_allclose(out['image'][2], odd['image'][2], atol=1e-6)  # the middle row
  assert out['targets'].shape == (5, 3)


def test_mixing_pipeline_is_deterministic_given_the_grain_seed():
  elements = [{'image': _pixels(i, 20, 24), 'label': i % 3} for i in range(6)]

  def batches(seed):
    ds = grain.MapDataset.source(elements).random_map(A.ThreeAugment(image_size=12), seed=seed)
    ds = ds.batch(3, drop_remainder=True).random_map(mixing.MixupCutmix(num_classes=3), seed=seed + 1)
    return [ds[i] for i in range(len(ds))]

  first, again, other = batches(0), batches(0), batches(5)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['targets'], b['targets'])
  assert first[0]['image'].shape == (3, 12, 12, 3) and first[0]['targets'].shape == (3, 3)
  assert not all(np.array_equal(a['targets'], b['targets']) for a, b in zip(first, other))


def test_mixup_cutmix_rejects_bad_settings_and_batches():
  with pytest.raises(ValueError, match='num_classes'):
    mixing.MixupCutmix(num_classes=0)
  with pytest.raises(ValueError, match='cutmix_alpha'):
    mixing.MixupCutmix(num_classes=3, cutmix_alpha=-1)
  with pytest.raises(ValueError, match='switch_prob'):
    mixing.MixupCutmix(num_classes=3, switch_prob=1.5)
  with pytest.raises(ValueError, match='label_smoothing'):
    mixing.MixupCutmix(num_classes=3, label_smoothing=1.0)
  mixer = mixing.MixupCutmix(num_classes=3)
  image = np.zeros((2, 4, 4, 3), np.float32)
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match=r'labels must be in \[0, 3\)'):
    mixer.random_map({'image': image, 'label': np.array([0, -1])}, rng)
  with pytest.raises(ValueError, match='labels must be in'):
    mixer.random_map({'image': image, 'label': np.array([0, 3])}, rng)
  with pytest.raises(ValueError, match='integer class labels'):
    mixer.random_map({'image': image, 'label': np.array([0.0, 1.0])}, rng)
  with pytest.raises(ValueError, match=r'image \[B, H, W, C\]'):
    mixer.random_map({'image': image[0], 'label': np.array([0, 1])}, rng)
