"""Image-caption batches: the host side of contrastive image-text training (CLIP).

``ImageTextBatches(augment, context_length)(examples, batch_size, seeds)``:
each example's image randomly resized-cropped (OpenCLIP's train transform)
and its caption tokenised -> ``image [B, S, S, 3]``, ``tokens [B,
context_length]`` int32, ``label``, ``index``, ``skipped``.

``augment`` keys: ``image_size``, ``crop_scale``, ``mean`` / ``std`` (default
OpenAI CLIP's); the recipe owns the config sections and passes them in.
"""

from vitreg_jax.data import tokenizer as tokenizer_lib
from vitreg_jax.data import transforms
from vitreg_jax.data.pipeline import section

AUGMENT_DEFAULTS = {
    'image_size': 224, 'crop_scale': (0.9, 1.0), 'mean': None, 'std': None,
    'eval_resize_size': None, 'eval_crop_size': None, 'native_max_size': None,
}


class ImageTextBatches:
  """The batch function (``train/recipe.py``, ``host_batches``) of image-text recipes."""

  def __init__(self, augment, context_length: int = tokenizer_lib.CONTEXT_LENGTH,
               bpe_path: str | None = None):
    aug = section({'augment': augment}, 'augment', AUGMENT_DEFAULTS)
    self.transform = transforms.ClipTrain(
        image_size=aug.image_size, crop_scale=aug.crop_scale,
        mean=aug.mean or transforms.CLIP_MEAN, std=aug.std or transforms.CLIP_STD,
        tokenizer=tokenizer_lib.ClipTokenizer(bpe_path, context_length))

  def __call__(self, examples, batch_size: int, seeds):
    ds = examples.random_map(self.transform, seed=seeds('augment'))
    return ds.batch(batch_size, drop_remainder=True)
