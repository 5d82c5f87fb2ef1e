"""DeiT III's 3-Augment: the supervised recipe's per-image augmentation.

Upstream (facebookresearch/deit ``augment.py``, ``new_data_aug_generator``;
README_revenge.md for the commands) composes, on PIL images:

1. spatial, one of
   * ``'src'`` (Simple Random Crop, ``--src``, the ImageNet-21k recipe):
     ``Resize(S)`` (shorter side, bicubic), ``RandomCrop(S, padding=4,
     padding_mode='reflect')``, ``RandomHorizontalFlip()``;
   * ``'rrc'`` (the ImageNet-1k recipe): timm's bicubic ``RandomResizedCrop(S,
     scale=(0.08, 1))`` (ratio 3/4..4/3), ``RandomHorizontalFlip()``;
2. ``RandomChoice`` of exactly one of grayscale, solarize (threshold 128) and
   Gaussian blur (PIL radius, i.e. sigma, uniform in [0.1, 2]), each p = 1
   (``operations`` narrows the choice; ``()`` skips the step);
3. ``ColorJitter(j, j, j)`` (brightness, contrast, saturation; no hue), skipped
   when ``--color-jitter`` is 0 (the recipes use 0.3);
4. ``ToTensor`` + ImageNet ``Normalize``.

Geometry stays in PIL/uint8 (``transforms.crop_resize`` /
``resize_shorter_side`` equal torchvision's). The blur is upstream's own PIL
filter on the uint8 crop: PIL approximates the Gaussian with box filters, which
below sigma ~0.8 differ clearly from a sampled kernel of the same sigma (at
sigma 0.3 the sampled kernel is nearly the identity, PIL's blur is not), so
``transforms.gaussian_blur_`` would alter over a third of the blur draws
(sigma ~ U(0.1, 2)). Grayscale, solarize and colour jitter
reuse the planar float32 ops of :mod:`vitreg_jax.data.transforms`
(torchvision's tensor formulas, without upstream's uint8 rounding after each op;
see that module).

Randomness: one row of ``NUM_UNIFORMS`` uniforms per image, in the layout of
:mod:`transforms` (RRC attempts, flip, jitter factors and order, blur sigma)
plus the columns below, so each decision reads its own entry.
"""

import grain
import numpy as np
from PIL import Image
from PIL import ImageFilter

from vitreg_jax.data import transforms as T

SPATIAL = ('src', 'rrc')
OPERATIONS = ('grayscale', 'solarize', 'blur')  # upstream's RandomChoice order
SRC_PADDING = 4
BLUR_SIGMA = (0.1, 2.0)  # upstream GaussianBlur radius_min, radius_max

U_CHOICE = T.NUM_UNIFORMS  # which of OPERATIONS
U_SRC_TOP = T.NUM_UNIFORMS + 1
U_SRC_LEFT = T.NUM_UNIFORMS + 2
NUM_UNIFORMS = T.NUM_UNIFORMS + 3


def _uniform_index(u, n):
  return min(int(u * n), n - 1)


def simple_random_crop(image, size, u_top, u_left, padding=SRC_PADDING):
  """``Resize(size)`` (bicubic) then ``RandomCrop(size, padding, 'reflect')``: uint8 [size, size, 3].

  ``u_top``/``u_left`` in [0, 1) pick the crop offset in the padded image,
  uniformly among the ``padded - size + 1`` positions like torchvision.
  """
  pixels = np.asarray(T.resize_shorter_side(image, size))
  padded = np.pad(pixels, ((padding, padding), (padding, padding), (0, 0)), mode='reflect')
  height, width = padded.shape[:2]
  top = _uniform_index(u_top, height - size + 1)
  left = _uniform_index(u_left, width - size + 1)
  return padded[top:top + size, left:left + size]


class ThreeAugment(grain.transforms.RandomMap):
  """One decoded image -> ``image`` float32 [S, S, 3] (normalised) + label/index/skipped."""

  def __init__(self, *, image_size=224, spatial='src', crop_scale=(0.08, 1.0), color_jitter=0.3,
               mean=T.IMAGENET_MEAN, std=T.IMAGENET_STD, blur_sigma=BLUR_SIGMA,
               operations=OPERATIONS):
    if spatial not in SPATIAL:
      raise ValueError(f'ThreeAugment spatial must be one of {SPATIAL}, got {spatial!r}')
    if int(image_size) < 1:
      raise ValueError(f'ThreeAugment image_size must be positive, got {image_size}')
    crop_scale = tuple(float(s) for s in crop_scale)
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
      raise ValueError(f'ThreeAugment crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}')
    color_jitter = 0.0 if color_jitter is None else float(color_jitter)
    if color_jitter < 0:
      raise ValueError(f'ThreeAugment color_jitter must be >= 0 (0 disables it), got {color_jitter}')
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
      raise ValueError(f'ThreeAugment needs 3 means and 3 positive stds, got {mean}, {std}')
    self.image_size, self.spatial, self.crop_scale = int(image_size), spatial, crop_scale
    self.jitter = (color_jitter, color_jitter, color_jitter, 0.0)  # no hue
    self.mean, self.std = tuple(mean), tuple(std)
    # The blur radius is in pixels: a 32-px smoke image needs it scaled with the size.
    self.blur_sigma = tuple(float(b) for b in blur_sigma)
    if len(self.blur_sigma) != 2 or not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
      raise ValueError(f'ThreeAugment blur_sigma must be 0 < lo <= hi, got {blur_sigma}')
    # Step 2 chooses among these; () skips it (upstream: all three).
    self.operations = tuple(operations)
    unknown = sorted(set(self.operations) - set(OPERATIONS))
    if unknown or len(set(self.operations)) != len(self.operations):
      raise ValueError(f'ThreeAugment operations must be distinct names from {OPERATIONS}, '
                       f'got {operations}')

  def spatial_crop(self, image, uniforms):
    """Step 1 (crop + horizontal flip p 0.5) of a PIL image: uint8 [S, S, 3]."""
    size = self.image_size
    if self.spatial == 'src':
      pixels = simple_random_crop(image, size, uniforms[U_SRC_TOP], uniforms[U_SRC_LEFT])
    else:
      box = T.random_resized_crop_box(uniforms[T.U_RRC], image.height, image.width, self.crop_scale)
      pixels = T.crop_resize(image, box, size)
    return pixels[:, ::-1] if uniforms[T.U_FLIP] < 0.5 else pixels

  def augment(self, image, uniforms):
    """All four steps, driven by one row of ``NUM_UNIFORMS`` uniforms: float32 [S, S, 3]."""
    pixels = self.spatial_crop(T._as_pil(image), uniforms)
    operation = (self.operations[_uniform_index(uniforms[U_CHOICE], len(self.operations))]
                 if self.operations else None)
    if operation == 'blur':
      lo, hi = self.blur_sigma
      sigma = lo + (hi - lo) * float(uniforms[T.U_BLUR_SIGMA])
      pixels = np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).filter(
          ImageFilter.GaussianBlur(radius=sigma)))
    x = T.to_planar(pixels)
    if operation == 'grayscale':
      T.to_grayscale_(x)
    elif operation == 'solarize':
      T.solarize_(x)
    if self.jitter[0] > 0:
      T.color_jitter_(x, uniforms, self.jitter)
    out = np.empty((self.image_size, self.image_size, 3), np.float32)
    T.normalize_into(x, out, self.mean, self.std)
    return out

  def random_map(self, element, rng: np.random.Generator):
    result = T._passthrough(element)
    result['image'] = self.augment(element['image'], rng.random(NUM_UNIFORMS))
    return result
