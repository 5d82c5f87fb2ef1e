"""The training pipeline over the batch function a config's kind names (no recipe needed)."""

from vitreg_jax.data import image_text, multicrop, pipeline


def train_pipeline(config, **kwargs):
  """Multi-crop (DINOv2's) or image-text (CLIP's) batches from ``config``, by ``config.kind``."""
  kind = config.get('kind', 'multicrop')
  if kind == 'image_text':
    config.augment = {k: v for k, v in config.augment.items() if k in image_text.AUGMENT_DEFAULTS}
    text = config.get('text', {})
    batches = image_text.ImageTextBatches(config.augment, text.get('context_length', 77),
                                          text.get('bpe_path'))
    return pipeline.build_train_pipeline(config, batches, **kwargs)
  config.augment = {k: v for k, v in config.augment.items() if k in multicrop.AUGMENT_DEFAULTS}
  return pipeline.build_train_pipeline(config, multicrop.MultiCropBatches(config), **kwargs)
