"""iBOT block masks: counts, block shapes and the batch-level stratification."""

import numpy as np
from scipy import ndimage

from vitreg_jax.data import masking


def test_block_masks_reach_but_never_exceed_the_target():
  generator = masking.BlockMaskGenerator(16, 16, max_num_patches=128)
  rng = np.random.default_rng(0)
  shortfalls = []
  for target in list(range(0, 129, 8)) * 5:
    mask = generator(rng, target)
    assert mask.shape == (16, 16) and mask.dtype == bool
    assert mask.sum() <= target
    shortfalls.append(target - mask.sum())
    if target == 0:
      assert not mask.any()
  assert np.mean(shortfalls) < 2.0  # growth stops early only rarely


def test_masks_are_made_of_blocks_of_at_least_min_patches():
  generator = masking.BlockMaskGenerator(16, 16, max_num_patches=128)
  rng = np.random.default_rng(1)
  for _ in range(50):
    mask = generator(rng, 40)
    _, regions = ndimage.label(mask)
    # A block not touching earlier ones covers >= 3 patches (area >= 4 before
    # rounding h and w), except the last one, capped by the remaining budget:
    # regions are few, unlike scattered-pixel masking.
    assert 1 <= regions <= mask.sum() / 3 + 1


def test_stratified_masks_half_masked_ratios_in_bins():
  generator = masking.BlockMaskGenerator(16, 16, max_num_patches=128)
  masks = masking.stratified_masks(np.random.default_rng(2), generator, 40)
  ratios = masks.reshape(40, -1).mean(-1)
  assert np.sum(ratios > 0) == 20
  assert np.all(ratios <= 0.5)
  bounds = np.linspace(0.1, 0.5, 21)
  np.testing.assert_array_less(np.sort(ratios[ratios > 0]), bounds[1:] + 1e-9)
  assert not np.array_equal(np.flatnonzero(ratios > 0), np.arange(20))  # shuffled over crops


def test_block_cap_follows_the_upstream_expression():
  # 0.5 * 98 // 14 * 98 // 14 = 21 for 98-px crops (not 24.5); 128 for 224.
  assert masking.IbotMasks(crop_size=98, patch_size=14).generator.max_num_patches == 21
  assert masking.IbotMasks(crop_size=224, patch_size=14).generator.max_num_patches == 128


def _batch(images):
  return {'global_crops': np.zeros((images, 2, 1, 1, 3), np.float32)}


def test_masks_stratified_per_group_fit_the_train_steps_budget():
  """The train step keeps ``mask_budget(2 g, N)`` slots per group of g images: never exceeded."""
  from vitreg_jax.losses import ibot  # pylint: disable=import-outside-toplevel
  group, images = 16, 64
  ibot_masks = masking.IbotMasks(crop_size=224, patch_size=14, group_size=group)
  budget = ibot.mask_budget(2 * group, 256)
  rng = np.random.default_rng(3)
  most = 0
  for _ in range(20):
    masks = ibot_masks.random_map(_batch(images), rng)['masks']
    assert masks.shape == (images, 2, 16, 16)
    per_group = masks.reshape(images // group, -1).sum(-1)
    assert np.all(per_group <= budget), (per_group, budget)
    most = max(most, per_group.max())
    # each group holds exactly half masked crops, its own ratio bins
    crops = masks.reshape(images // group, 2 * group, -1).any(-1).sum(-1)
    np.testing.assert_array_equal(crops, group)
  assert most > 0.9 * budget  # the budget is tight, not padded
  # Stratified over the whole batch instead (the old behaviour), groups overflow it.
  whole = masking.IbotMasks(crop_size=224, patch_size=14)
  overflow = [whole.random_map(_batch(images), rng)['masks'].reshape(images // group, -1).sum(-1)
              for _ in range(20)]
  assert np.max(overflow) > budget


def test_group_must_divide_the_per_process_batch():
  ibot_masks = masking.IbotMasks(crop_size=28, patch_size=7, group_size=3)
  try:
    ibot_masks.random_map(_batch(8), np.random.default_rng(0))
  except ValueError as e:
    assert 'group_size=3' in str(e) and '8 images' in str(e)
  else:
    raise AssertionError('a group that does not divide the batch must fail')
