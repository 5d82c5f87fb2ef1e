"""Image-caption batches: the host side of contrastive image-text training (CLIP).

``ImageTextBatches(config)(examples, batch_size, seeds)``: each example's
image randomly resized-cropped (OpenCLIP's train transform) and its caption
tokenised -> ``image [B, S, S, 3]``, ``tokens [B, context_length]`` int32,
``label``, ``index``, ``skipped``.

Config keys: ``augment.image_size``, ``augment.crop_scale``, ``augment.mean`` /
``std`` (default OpenAI CLIP's), ``text.context_length``, ``text.bpe_path``.
"""

from vitreg_jax.data import tokenizer as tokenizer_lib
from vitreg_jax.data import transforms
from vitreg_jax.data.pipeline import section

AUGMENT_DEFAULTS = {
    'image_size': 224, 'crop_scale': (0.9, 1.0), 'mean': None, 'std': None,
    'eval_resize_size': None, 'eval_crop_size': None, 'native_max_size': None,
}
TEXT_DEFAULTS = {'context_length': tokenizer_lib.CONTEXT_LENGTH, 'bpe_path': None}


class ImageTextBatches:
  """The batch function (``train/recipe.py``, ``host_batches``) of image-text recipes."""

  def __init__(self, config):
    aug = section(config, 'augment', AUGMENT_DEFAULTS)
    text = section(config, 'text', TEXT_DEFAULTS)
    self.transform = transforms.ClipTrain(
        image_size=aug.image_size, crop_scale=aug.crop_scale,
        mean=aug.mean or transforms.CLIP_MEAN, std=aug.std or transforms.CLIP_STD,
        tokenizer=tokenizer_lib.ClipTokenizer(text.bpe_path, text.context_length))

  def __call__(self, examples, batch_size: int, seeds):
    ds = examples.random_map(self.transform, seed=seeds('augment'))
    return ds.batch(batch_size, drop_remainder=True)
