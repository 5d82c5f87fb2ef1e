"""iBOT block-wise patch masks, made in the input pipeline (REFERENCE §3).

DINOv2 masks half of the global crops of each (per-device) batch, with target
ratios spread evenly over ``linspace(0.1, 0.5)`` (each masked crop draws its
ratio uniformly inside its own bin), and shuffles which crops get which mask.
A mask is grown from BEiT-style rectangular blocks: each block has area
uniform in [min_num_patches, remaining] and log-uniform aspect ratio in
[0.3, 1/0.3], and is kept only if it adds between 1 and ``remaining`` new
patches; growth stops at the target or after ten failed tries.

:class:`IbotMasks` runs on a *batch* (a grain ``random_map`` after batching) and
stratifies the ratios within every group of ``group_size`` consecutive images,
like the upstream collate function does per GPU. The train step's fixed
masked-patch budget is computed for the same groups
(``losses.ibot.mask_budget``), so no masked patch is ever dropped.
"""

import math

import grain
import numpy as np


class BlockMaskGenerator:
  """BEiT block masking on a ``height x width`` patch grid."""

  def __init__(self, height, width, *, min_num_patches=4, max_num_patches=None,
               min_aspect=0.3, max_aspect=None):
    self.height, self.width = int(height), int(width)
    self.num_patches = self.height * self.width
    self.min_num_patches = min_num_patches
    self.max_num_patches = self.num_patches if max_num_patches is None else max_num_patches
    max_aspect = max_aspect or 1 / min_aspect
    self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

  def _add_block(self, mask, rng, max_new):
    """Tries up to ten blocks; returns how many patches the first useful one added."""
    for _ in range(10):
      # a + (b - a) * u like Python's random.uniform: fine when max_new < min_num_patches.
      target_area = self.min_num_patches + (max_new - self.min_num_patches) * rng.random()
      aspect = math.exp(rng.uniform(*self.log_aspect))
      h = int(round(math.sqrt(target_area * aspect)))
      w = int(round(math.sqrt(target_area / aspect)))
      if w < self.width and h < self.height:
        top = int(rng.integers(0, self.height - h + 1))
        left = int(rng.integers(0, self.width - w + 1))
        block = mask[top:top + h, left:left + w]
        new = h * w - int(block.sum())
        if 0 < new <= max_new:
          block[...] = True
          return new
    return 0

  def __call__(self, rng: np.random.Generator, num_masking_patches: int) -> np.ndarray:
    mask = np.zeros((self.height, self.width), bool)
    count = 0
    while count < num_masking_patches:
      added = self._add_block(mask, rng, min(num_masking_patches - count, self.max_num_patches))
      if added == 0:
        break
      count += added
    return mask


def stratified_masks(rng, generator: BlockMaskGenerator, num_crops: int, *,
                     mask_probability=0.5, ratio_min_max=(0.1, 0.5)) -> np.ndarray:
  """Masks for ``num_crops`` crops: ``int(num_crops * p)`` masked, ratios stratified, shuffled."""
  num_masked = int(num_crops * mask_probability)
  bounds = np.linspace(ratio_min_max[0], ratio_min_max[1], num_masked + 1)
  masks = np.zeros((num_crops, generator.height, generator.width), bool)
  for i in range(num_masked):
    ratio = rng.uniform(bounds[i], bounds[i + 1])
    masks[i] = generator(rng, int(generator.num_patches * ratio))
  return masks[rng.permutation(num_crops)]


class IbotMasks(grain.transforms.RandomMap):
  """Adds ``masks`` bool [B, n_global, h, w] to a multi-crop batch (h = w = crop // patch)."""

  def __init__(self, *, crop_size, patch_size, mask_probability=0.5, ratio_min_max=(0.1, 0.5),
               min_num_patches=4, max_ratio_per_block=0.5, min_aspect=0.3, group_size=None):
    if crop_size % patch_size:
      raise ValueError(f'global crop size {crop_size} is not a multiple of masking.patch_size {patch_size}')
    if not 0 <= ratio_min_max[0] <= ratio_min_max[1] <= 1:
      raise ValueError(f'masking.ratio_min_max must satisfy 0 <= lo <= hi <= 1, got {tuple(ratio_min_max)}')
    if not 0 <= mask_probability <= 1:
      raise ValueError(f'masking.mask_probability must be in [0, 1], got {mask_probability}')
    grid = crop_size // patch_size
    # Upstream's block cap, evaluated as written there: 0.5 * size // p * size // p.
    max_block = max_ratio_per_block * crop_size // patch_size * crop_size // patch_size
    self.generator = BlockMaskGenerator(grid, grid, min_num_patches=min_num_patches,
                                        max_num_patches=max_block, min_aspect=min_aspect)
    self.mask_probability = mask_probability
    self.ratio_min_max = tuple(ratio_min_max)
    self.group_size = group_size  # images per stratification group; None: the whole batch

  def random_map(self, batch, rng: np.random.Generator):
    batch_size, num_global = batch['global_crops'].shape[:2]
    group = self.group_size or batch_size
    if batch_size % group:
      raise ValueError(f'the per-process batch ({batch_size} images) is not a multiple of '
                       f'group_size={group}: iBOT masks are stratified within groups')
    masks = np.concatenate([
        stratified_masks(rng, self.generator, group * num_global,
                         mask_probability=self.mask_probability, ratio_min_max=self.ratio_min_max)
        for _ in range(batch_size // group)])
    batch['masks'] = masks.reshape(batch_size, num_global, self.generator.height, self.generator.width)
    return batch
