"""Image transforms for the grain pipelines: DINOv2 multi-crop, CLIP, evaluation.

Geometry goes through PIL (crop then bicubic resize, exactly torchvision's
``RandomResizedCrop`` on PIL images, which is what DINOv2 and OpenCLIP train
with). Photometric operations run in place on planar float32 ``[3, H, W]``
arrays in [0, 1] with torchvision's *tensor* formulas (``ColorJitter``,
``Grayscale``, ``GaussianBlur``, ``RandomSolarize``; tested equal): each crop is
converted from uint8 once and normalised into its output slot, without the uint8
round trips of upstream's PIL path (which rounds to uint8 after every op and
shifts hue in 1/256 steps; statistically the same augmentation). Planar layout
keeps numpy on contiguous memory; experiments/benchmarks/input_pipeline.py
measures this at about 2x torchvision per worker.

Randomness: every crop draws one fixed-length row of uniforms (layout ``U_*``
below) from the grain-provided generator, and each decision reads its own
entry. Changing one probability therefore changes only that decision, which
makes the augmentation statistics testable by comparing outputs.

DINOv2 recipe (REFERENCE §3): 2 global crops (224, scale 0.32-1) + N local crops
(96, scale 0.05-0.32), flip 0.5, ColorJitter(.4, .4, .2, .1) with p .8, grayscale
p .2, Gaussian blur (kernel 9, sigma 0.1-2) with per-crop probabilities
``BLUR_PROBS``, solarisation (threshold 128) with p .2 on global crop 2,
ImageNet normalisation. Crops are grouped by size: ``global_crops [2, G, G, 3]``,
``local_crops [N, L, L, 3]``, so the model runs one pass per resolution.
"""

import itertools
import math

import grain
import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP / OpenCLIP
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Blur probability for (global crop 1, global crop 2, local crops). Upstream
# DINOv2's GaussianBlur wrapper applies its transform with probability 1 - p, so
# the released models were trained with the 'as_trained' values; 'intended' are
# the BYOL/DINO values the config meant.
BLUR_PROBS = {'as_trained': (0.0, 0.9, 0.5), 'intended': (1.0, 0.1, 0.5)}

GRAY_WEIGHTS = np.asarray((0.2989, 0.587, 0.114), np.float32)  # torchvision's rgb_to_grayscale
RRC_RATIO = (3 / 4, 4 / 3)
RRC_ATTEMPTS = 10
BLUR_KERNEL = 9
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128 / 255
_JITTER_ORDERS = tuple(itertools.permutations(range(4)))  # brightness, contrast, saturation, hue

# Column layout of each crop's row of uniforms.
U_RRC = slice(0, 4 * RRC_ATTEMPTS)  # (area, log-ratio, top, left) per attempt
U_FLIP = 40
U_JITTER = 41
U_JITTER_FACTORS = slice(42, 46)  # brightness, contrast, saturation, hue
U_JITTER_ORDER = 46
U_GRAY = 47
U_BLUR = 48
U_BLUR_SIGMA = 49
U_SOLARIZE = 50
NUM_UNIFORMS = 51


# ---------------------------------------------------------------------------
# Geometry

def random_resized_crop_box(uniforms, height, width, scale, ratio=RRC_RATIO):
  """torchvision ``RandomResizedCrop.get_params`` driven by 40 uniforms: (top, left, h, w)."""
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for attempt in range(RRC_ATTEMPTS):
    u_area, u_ratio, u_top, u_left = uniforms[4 * attempt:4 * attempt + 4]
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = min(int(u_top * (height - h + 1)), height - h)
      left = min(int(u_left * (width - w + 1)), width - w)
      return top, left, h, w
  # Fallback: the central crop with the closest allowed aspect ratio.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(image: Image.Image, box, size: int) -> np.ndarray:
  """Crop ``(top, left, h, w)`` then bicubic-resize to ``size`` x ``size`` (uint8 [s, s, 3])."""
  top, left, h, w = box
  region = image.crop((left, top, left + w, top + h))
  return np.asarray(region.resize((size, size), Image.BICUBIC))


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
  """torchvision ``Resize(size)``: shorter side to ``size``, longer side truncated."""
  width, height = image.size
  if width <= height:
    new_w, new_h = size, int(size * height / width)
  else:
    new_w, new_h = int(size * width / height), size
  if (new_w, new_h) == (width, height):
    return image
  return image.resize((new_w, new_h), Image.BICUBIC)


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
  """torchvision ``CenterCrop`` for an image at least ``size`` on each side."""
  height, width = array.shape[:2]
  if height < size or width < size:
    raise ValueError(f'center_crop({size}) needs an image at least that large, got {height}x{width}')
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return array[top:top + size, left:left + size]


# ---------------------------------------------------------------------------
# Photometric operations on planar float32 images [3, H, W] in [0, 1], in place.
# Planar layout keeps every numpy operation on contiguous memory, where numpy's
# vectorised loops apply (interleaved channel views are several times slower).

def grayscale(x):
  """torchvision ``rgb_to_grayscale`` weights: [H, W]."""
  gray = x[0] * GRAY_WEIGHTS[0]
  gray += x[1] * GRAY_WEIGHTS[1]
  gray += x[2] * GRAY_WEIGHTS[2]
  return gray


def adjust_brightness_(x, factor):
  x *= np.float32(factor)
  np.clip(x, 0.0, 1.0, out=x)


def adjust_contrast_(x, factor):
  mean = float(grayscale(x).mean())
  x *= np.float32(factor)
  x += np.float32((1.0 - factor) * mean)
  np.clip(x, 0.0, 1.0, out=x)


def adjust_saturation_(x, factor):
  gray = grayscale(x)
  gray *= np.float32(1.0 - factor)
  x *= np.float32(factor)
  x += gray
  np.clip(x, 0.0, 1.0, out=x)


def adjust_hue_(x, shift):
  """Rotates hue by ``shift`` turns (torchvision ``adjust_hue``: RGB -> HSV -> RGB)."""
  r, g, b = x
  maxc = np.maximum(np.maximum(r, g), b)
  minc = np.minimum(np.minimum(r, g), b)
  chroma = maxc - minc
  inverse = np.divide(1.0, chroma, out=np.zeros_like(chroma), where=chroma > 0)
  # Hue in sixths of a turn: max channel r -> [-1, 1], g -> [1, 3], b -> [3, 5].
  hue = np.where(maxc == r, g - b, np.where(maxc == g, (b - r) + 2 * chroma, (r - g) + 4 * chroma))
  hue *= inverse
  hue += np.float32(6.0 * shift)
  # |shift| <= 0.5 turn, so one wrap either way brings hue into [0, 6).
  hue = np.where(hue < 0, hue + 6.0, np.where(hue >= 6.0, hue - 6.0, hue))
  # HSV -> RGB with value = maxc: channel = minc + chroma * ramp(hue), with the
  # ramps of a pure hue: r = |h-3|-1, g = 2-|h-2|, b = 2-|h-4|, clipped to [0, 1].
  ramp = np.empty_like(hue)
  for channel, (centre, sign, offset) in enumerate(((3.0, 1.0, -1.0), (2.0, -1.0, 2.0), (4.0, -1.0, 2.0))):
    np.subtract(hue, np.float32(centre), out=ramp)
    np.abs(ramp, out=ramp)
    if sign < 0:
      np.negative(ramp, out=ramp)
    ramp += np.float32(offset)
    np.clip(ramp, 0.0, 1.0, out=ramp)
    ramp *= chroma
    np.add(minc, ramp, out=x[channel])


def to_grayscale_(x):
  x[...] = grayscale(x)


def solarize_(x, threshold=SOLARIZE_THRESHOLD):
  np.subtract(1.0, x, out=x, where=x >= threshold)


def gaussian_kernel1d(sigma, size=BLUR_KERNEL):
  t = np.linspace(-(size - 1) / 2, (size - 1) / 2, size)
  weights = np.exp(-0.5 * (t / sigma) ** 2)
  return (weights / weights.sum()).astype(np.float32)


def gaussian_blur_(x, sigma, size=BLUR_KERNEL):
  """torchvision ``gaussian_blur`` (separable, reflect padding) on a [3, H, W] image."""
  kernel = gaussian_kernel1d(sigma, size)
  half = size // 2
  pair = np.empty_like(x)
  for axis in (1, 2):
    n = x.shape[axis]
    pad = [(0, 0)] * 3
    pad[axis] = (half, half)
    padded = np.pad(x, pad, mode='reflect')
    take = lambda start: padded[:, start:start + n] if axis == 1 else padded[:, :, start:start + n]
    np.multiply(take(half), kernel[half], out=x)
    for t in range(half):  # the kernel is symmetric: pair taps t and size-1-t
      np.add(take(t), take(size - 1 - t), out=pair)
      pair *= kernel[t]
      x += pair


def to_planar(pixels: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> contiguous float32 [3, H, W] in [0, 1]."""
  planar = np.empty((3,) + pixels.shape[:2], np.float32)
  np.multiply(pixels.transpose(2, 0, 1), np.float32(1 / 255), out=planar)
  return planar


def normalize_into(planar, out, mean, std):
  """(planar - mean) / std written to ``out`` [H, W, 3] (``planar`` is clobbered)."""
  for c in range(3):
    planar[c] *= np.float32(1 / std[c])
    planar[c] -= np.float32(mean[c] / std[c])
  np.copyto(out, planar.transpose(1, 2, 0))


def normalize_(x, mean, std):
  """In-place normalisation of an interleaved [..., 3] image."""
  x -= np.asarray(mean, np.float32)
  x *= np.asarray([1.0 / s for s in std], np.float32)


def _jitter_factor(u, strength, centre):
  """torchvision ColorJitter ranges: [max(0, 1-s), 1+s] for b/c/s, [-s, s] for hue."""
  lo, hi = (max(0.0, 1.0 - strength), 1.0 + strength) if centre else (-strength, strength)
  return lo + (hi - lo) * u


def color_jitter_(x, uniforms, strengths):
  """Brightness, contrast, saturation and hue in the random order torchvision uses."""
  ops = (adjust_brightness_, adjust_contrast_, adjust_saturation_, adjust_hue_)
  order = _JITTER_ORDERS[min(int(uniforms[U_JITTER_ORDER] * 24), 23)]
  factors = uniforms[U_JITTER_FACTORS]
  for op_index in order:
    strength = strengths[op_index]
    if strength > 0:
      factor = _jitter_factor(factors[op_index], strength, centre=op_index < 3)
      ops[op_index](x, factor)


# ---------------------------------------------------------------------------
# Grain transforms

def _as_pil(image):
  return image if isinstance(image, Image.Image) else Image.fromarray(image)


def _passthrough(element):
  """The bookkeeping fields every pipeline keeps next to the pixels."""
  return {'label': np.int32(element.get('label', -1)), 'index': np.int32(element.get('index', -1)),
          'skipped': np.int32(element.get('skipped', 0))}


class DinoMultiCrop(grain.transforms.RandomMap):
  """DINOv2 multi-crop augmentation of one decoded image (see module docstring)."""

  def __init__(self, *, global_crops_size=224, local_crops_size=96, local_crops_number=8,
               global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32),
               blur_probs='as_trained', flip_prob=0.5, color_jitter_prob=0.8,
               color_jitter=(0.4, 0.4, 0.2, 0.1), grayscale_prob=0.2, solarize_prob=0.2,
               mean=IMAGENET_MEAN, std=IMAGENET_STD):
    if isinstance(blur_probs, str):
      if blur_probs not in BLUR_PROBS:
        raise ValueError(f'augment.blur_probs must be one of {sorted(BLUR_PROBS)} or a '
                         f'(global 1, global 2, local) tuple, got {blur_probs!r}')
      blur_probs = BLUR_PROBS[blur_probs]
    if len(blur_probs) != 3 or not all(0 <= p <= 1 for p in blur_probs):
      raise ValueError(f'augment.blur_probs as a tuple needs 3 probabilities, got {blur_probs!r}')
    for name, scale in (('global_crops_scale', global_crops_scale), ('local_crops_scale', local_crops_scale)):
      if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f'augment.{name} must satisfy 0 < lo <= hi <= 1, got {tuple(scale)}')
    if local_crops_number < 0:
      raise ValueError(f'augment.local_crops_number must be >= 0, got {local_crops_number}')
    self.global_size, self.local_size = int(global_crops_size), int(local_crops_size)
    self.local_number = int(local_crops_number)
    self.global_scale, self.local_scale = tuple(global_crops_scale), tuple(local_crops_scale)
    self.blur_probs = tuple(float(p) for p in blur_probs)
    self.flip_prob, self.jitter_prob, self.gray_prob = flip_prob, color_jitter_prob, grayscale_prob
    self.jitter = tuple(color_jitter)
    self.solarize_prob = solarize_prob
    self.mean, self.std = tuple(mean), tuple(std)

  def crop_plan(self):
    """Per crop: (size, scale, blur probability, solarize probability)."""
    g, l = (self.global_size, self.global_scale), (self.local_size, self.local_scale)
    plan = [(*g, self.blur_probs[0], 0.0), (*g, self.blur_probs[1], self.solarize_prob)]
    return plan + [(*l, self.blur_probs[2], 0.0)] * self.local_number

  def augment_crop(self, image, uniforms, size, scale, blur_prob, solarize_prob, out):
    """One crop of ``image`` (PIL) into ``out`` (float32 [size, size, 3]), normalised."""
    box = random_resized_crop_box(uniforms[U_RRC], image.height, image.width, scale)
    pixels = crop_resize(image, box, size)
    if uniforms[U_FLIP] < self.flip_prob:
      pixels = pixels[:, ::-1]
    x = to_planar(pixels)
    if uniforms[U_JITTER] < self.jitter_prob:
      color_jitter_(x, uniforms, self.jitter)
    if uniforms[U_GRAY] < self.gray_prob:
      to_grayscale_(x)
    if uniforms[U_BLUR] < blur_prob:
      gaussian_blur_(x, BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * uniforms[U_BLUR_SIGMA])
    if uniforms[U_SOLARIZE] < solarize_prob:
      solarize_(x)
    normalize_into(x, out, self.mean, self.std)

  def augment_into(self, element, rng: np.random.Generator, global_out, local_out):
    """All crops of one image, written into ``global_out [2, G, G, 3]``, ``local_out [N, L, L, 3]``."""
    image = _as_pil(element['image'])
    plan = self.crop_plan()
    uniforms = rng.random((len(plan), NUM_UNIFORMS))
    for c, (size, scale, blur_prob, solarize_prob) in enumerate(plan):
      out = global_out[c] if c < 2 else local_out[c - 2]
      self.augment_crop(image, uniforms[c], size, scale, blur_prob, solarize_prob, out)

  def empty_batch(self, batch_size):
    batch = {'global_crops': np.empty((batch_size, 2, self.global_size, self.global_size, 3), np.float32),
             'label': np.empty(batch_size, np.int32), 'index': np.empty(batch_size, np.int32),
             'skipped': np.empty(batch_size, np.int32)}
    if self.local_number:
      batch['local_crops'] = np.empty(
          (batch_size, self.local_number, self.local_size, self.local_size, 3), np.float32)
    return batch

  def random_map(self, element, rng: np.random.Generator):
    """One image -> its crops (for a batch, :class:`BatchedMultiCrop` avoids the stacking copy)."""
    batch = self.empty_batch(1)
    self.augment_into(element, rng, batch['global_crops'][0], batch.get('local_crops', [None])[0])
    result = {key: value[0] for key, value in batch.items()}
    result.update(_passthrough(element))
    return result


class BatchedMultiCrop(grain.transforms.RandomMap):
  """:class:`DinoMultiCrop` over a list of decoded examples, written straight into batch arrays."""

  def __init__(self, multicrop: DinoMultiCrop):
    self.multicrop = multicrop

  def random_map(self, elements, rng: np.random.Generator):
    batch = self.multicrop.empty_batch(len(elements))
    for b, element in enumerate(elements):
      local_out = batch['local_crops'][b] if 'local_crops' in batch else None
      self.multicrop.augment_into(element, rng, batch['global_crops'][b], local_out)
      for key, value in _passthrough(element).items():
        batch[key][b] = value
    return batch


class ClipTrain(grain.transforms.RandomMap):
  """OpenCLIP's training transform (RandomResizedCrop, scale 0.9-1, bicubic) + caption tokens."""

  def __init__(self, *, image_size=224, crop_scale=(0.9, 1.0), mean=CLIP_MEAN, std=CLIP_STD,
               tokenizer=None):
    self.image_size, self.crop_scale = int(image_size), tuple(crop_scale)
    self.mean, self.std = tuple(mean), tuple(std)
    self.tokenizer = tokenizer

  def random_map(self, element, rng: np.random.Generator):
    image = _as_pil(element['image'])
    uniforms = rng.random(NUM_UNIFORMS)
    box = random_resized_crop_box(uniforms[U_RRC], image.height, image.width, self.crop_scale)
    pixels = np.empty((self.image_size, self.image_size, 3), np.float32)
    normalize_into(to_planar(crop_resize(image, box, self.image_size)), pixels, self.mean, self.std)
    caption = element.get('caption', '')
    if not isinstance(caption, str):  # several captions per image: one per sample
      caption = caption[int(rng.integers(len(caption)))] if len(caption) else ''
    result = _passthrough(element)
    result['image'] = pixels
    result['tokens'] = self.tokenizer.tokenize([caption])[0]
    return result


class EvalCenterCrop(grain.transforms.Map):
  """Resize the shorter side (bicubic) then centre-crop: 256/224 for DINOv2, 224/224 for CLIP."""

  def __init__(self, *, resize_size=256, crop_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    if resize_size < crop_size:
      raise ValueError(f'eval resize_size ({resize_size}) must be >= crop_size ({crop_size})')
    self.resize_size, self.crop_size = int(resize_size), int(crop_size)
    self.mean, self.std = tuple(mean), tuple(std)

  def map(self, element):
    image = resize_shorter_side(_as_pil(element['image']), self.resize_size)
    pixels = center_crop(np.asarray(image), self.crop_size)
    pixels = np.multiply(pixels, np.float32(1 / 255), dtype=np.float32)
    normalize_(pixels, self.mean, self.std)
    result = _passthrough(element)
    result['image'] = pixels
    result['valid'] = np.int32(element.get('valid', 1))
    return result


class EvalNative(grain.transforms.Map):
  """LOST-style input: native resolution, normalised, zero-padded to a multiple of the patch.

  Outputs ``image [Hp, Wp, 3]``, ``size`` = the unpadded (h, w), and ``boxes``
  in pixels of the unpadded image (x0, y0, x1, y1). ``max_size`` optionally
  bounds the longer side first (bicubic), for very large images.
  """

  def __init__(self, *, patch_size=14, mean=IMAGENET_MEAN, std=IMAGENET_STD, max_size=None):
    self.patch_size, self.max_size = int(patch_size), max_size
    self.mean, self.std = tuple(mean), tuple(std)

  def map(self, element):
    image = _as_pil(element['image'])
    if self.max_size and max(image.size) > self.max_size:
      factor = self.max_size / max(image.size)
      image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))),
                           Image.BICUBIC)
    height, width = image.height, image.width
    p = self.patch_size
    padded = np.zeros((-(-height // p) * p, -(-width // p) * p, 3), np.float32)
    view = padded[:height, :width]
    np.multiply(np.asarray(image), np.float32(1 / 255), out=view)
    normalize_(view, self.mean, self.std)
    result = _passthrough(element)
    result['image'] = padded
    result['size'] = np.asarray((height, width), np.int32)
    boxes = np.asarray(element.get('boxes', np.zeros((0, 4))), np.float32).reshape(-1, 4)
    result['boxes'] = boxes * np.asarray((width, height, width, height), np.float32)
    result['valid'] = np.int32(element.get('valid', 1))
    return result
