"""Multi-crop batches with iBOT masks: the host side of DINOv2-style self-distillation.

``MultiCropBatches(config)(examples, batch_size, seeds)`` turns decoded examples
into batches of ``global_crops [B, 2, G, G, 3]``, ``local_crops [B, n, L, L, 3]``
(when n > 0) and ``masks [B, 2, G/p, G/p]`` (plus ``label``, ``index``,
``skipped``). Mask ratios are stratified within ``config.group_size``
consecutive images, the groups the iBOT masked-patch budget is computed for.

Config keys: ``augment.*`` (crop sizes, scales, blur / jitter / solarize
probabilities, mean, std, and the eval pipeline's ``eval_*`` keys),
``masking.*``, ``group_size``.
"""

from vitreg_jax.data import masking
from vitreg_jax.data import transforms
from vitreg_jax.data.pipeline import section

AUGMENT_DEFAULTS = {
    'global_crops_size': 224, 'local_crops_size': 96, 'local_crops_number': 8,
    'global_crops_scale': (0.32, 1.0), 'local_crops_scale': (0.05, 0.32), 'blur_probs': 'as_trained',
    'flip_prob': 0.5, 'color_jitter_prob': 0.8, 'color_jitter': (0.4, 0.4, 0.2, 0.1),
    'grayscale_prob': 0.2, 'solarize_prob': 0.2,
    'mean': None, 'std': None,
    'eval_resize_size': None, 'eval_crop_size': None, 'native_max_size': None,
}
MASKING_DEFAULTS = {
    'patch_size': 14, 'mask_probability': 0.5, 'ratio_min_max': (0.1, 0.5), 'min_num_patches': 4,
    'max_ratio_per_block': 0.5, 'min_aspect': 0.3,
}


class MultiCropBatches:
  """The batch function (see ``train/recipe.py``, ``host_batches``) of multi-crop recipes."""

  def __init__(self, config):
    aug = section(config, 'augment', AUGMENT_DEFAULTS)
    mask = section(config, 'masking', MASKING_DEFAULTS)
    self.multicrop = transforms.DinoMultiCrop(
        global_crops_size=aug.global_crops_size, local_crops_size=aug.local_crops_size,
        local_crops_number=aug.local_crops_number, global_crops_scale=aug.global_crops_scale,
        local_crops_scale=aug.local_crops_scale, blur_probs=aug.blur_probs,
        flip_prob=aug.flip_prob, color_jitter_prob=aug.color_jitter_prob,
        color_jitter=aug.color_jitter, grayscale_prob=aug.grayscale_prob,
        solarize_prob=aug.solarize_prob,
        mean=aug.mean or transforms.IMAGENET_MEAN, std=aug.std or transforms.IMAGENET_STD)
    self.masks = masking.IbotMasks(
        crop_size=aug.global_crops_size, patch_size=mask.patch_size,
        mask_probability=mask.mask_probability, ratio_min_max=mask.ratio_min_max,
        min_num_patches=mask.min_num_patches, max_ratio_per_block=mask.max_ratio_per_block,
        min_aspect=mask.min_aspect, group_size=config.get('group_size'))

  def __call__(self, examples, batch_size: int, seeds):
    ds = examples.batch(batch_size, drop_remainder=True, batch_fn=list)
    ds = ds.random_map(transforms.BatchedMultiCrop(self.multicrop), seed=seeds('augment'))
    return ds.random_map(self.masks, seed=seeds('masks'))
