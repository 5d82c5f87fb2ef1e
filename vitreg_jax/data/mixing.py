"""Mixup / CutMix on whole batches, with soft targets (DeiT III's supervised recipe).

facebookresearch/deit ``main.py`` wraps every training batch in timm's
``Mixup`` (``timm/data/mixup.py``, mode ``'batch'``); :class:`MixupCutmix`
reproduces it on the host, as a grain ``random_map`` after batching:

* One draw per batch. With probability ``prob`` the batch is mixed; with both
  alphas > 0, CutMix with probability ``switch_prob``, else Mixup; only one
  alpha > 0 means always that one. ``lam ~ Beta(alpha, alpha)`` of the choice.
* The partner of row ``i`` is row ``B - 1 - i`` (the batch flipped). timm
  asserts an even batch; here any size works (an odd batch's middle row, or a
  batch of one, mixes with itself).
* Mixup: ``x = lam * x + (1 - lam) * flip(x)``.
* CutMix: a box of ``int(H sqrt(1 - lam))`` x ``int(W sqrt(1 - lam))`` pixels
  centred on a pixel drawn uniformly over the image, rows
  ``[cy - cut_h // 2, cy + (cut_h + 1) // 2)`` (columns alike) clipped to the
  image, takes the flipped batch's pixels; ``lam`` becomes ``1 - box area /
  image area`` (timm's ``correct_lam``). This is timm 1.0.31's box; timm
  1.0.15 and the older releases deit used end it at ``cy + cut_h // 2``, one
  pixel shorter for odd sizes (``lam`` is corrected either way).
* Targets: ``lam * smooth(onehot(y)) + (1 - lam) * smooth(onehot(flip(y)))``
  with ``off = s / K`` and ``on = 1 - s + off`` (timm ``mixup_target``).

Recipes (README_revenge.md): ImageNet-1k mixup 0.8 + cutmix 1.0, smoothing 0 with
``--bce-loss``; ImageNet-21k cutmix 1.0 only, smoothing 0.1. Both alphas 0 is
"no mixing": the targets are the smoothed one-hot labels. ``--bce-loss``
binarises the targets (``targets > 0``) inside the loss, so only the soft
targets are made here.
"""

import collections
import math

import grain
import numpy as np

MixParams = collections.namedtuple('MixParams', 'mode lam box')  # mode: 'none' | 'mixup' | 'cutmix'

# Layout of each batch's uniforms (the Beta draws follow them).
U_APPLY, U_SWITCH, U_CENTRE_Y, U_CENTRE_X = range(4)
NUM_UNIFORMS = 4


def smoothed_one_hot(labels, num_classes, smoothing=0.0):
  """float32 [B, num_classes]: ``1 - s + s / K`` at the label, ``s / K`` elsewhere."""
  off = smoothing / num_classes
  targets = np.full((len(labels), num_classes), off, np.float32)
  targets[np.arange(len(labels)), labels] = 1.0 - smoothing + off
  return targets


def mix_targets(labels, num_classes, lam, smoothing=0.0):
  """timm ``mixup_target``: ``lam * smooth(y) + (1 - lam) * smooth(flip(y))``, float32 [B, K]."""
  targets = smoothed_one_hot(np.asarray(labels), num_classes, smoothing)
  return (targets * np.float32(lam) + targets[::-1] * np.float32(1.0 - lam)).astype(np.float32)


def cutmix_box(lam, height, width, centre):
  """The CutMix box for ``lam`` centred at pixel ``centre = (cy, cx)``.

  Returns ``((y0, y1, x0, x1), corrected_lam)``: rows ``y0:y1`` and columns
  ``x0:x1`` (clipped to the image), and ``1 - box area / image area``.
  """
  ratio = math.sqrt(1.0 - lam)
  cut_h, cut_w = int(height * ratio), int(width * ratio)
  cy, cx = centre
  y0, y1 = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
  x0, x1 = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
  return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)


def mixup_images(images, lam):
  """``lam * x + (1 - lam) * flip(x)`` over the batch axis (a new array, dtype kept)."""
  dtype = images.dtype.type
  mixed = images * dtype(lam)
  mixed += images[::-1] * dtype(1.0 - lam)
  return mixed


def cutmix_images(images, box):
  """``images`` [B, H, W, C] with the flipped batch pasted into ``box`` (a new array)."""
  y0, y1, x0, x1 = box
  mixed = images.copy()
  mixed[:, y0:y1, x0:x1] = images[::-1, y0:y1, x0:x1]
  return mixed


class MixupCutmix(grain.transforms.RandomMap):
  """Batch ``{'image' [B, H, W, C], 'label' [B], ...}`` -> mixed ``image`` + ``targets`` [B, K].

  Other keys pass through; ``label`` keeps the unmixed labels.
  """

  def __init__(self, *, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5,
               label_smoothing=0.1, prob=1.0):
    if int(num_classes) != num_classes or num_classes < 1:
      raise ValueError(f'MixupCutmix num_classes must be a positive integer, got {num_classes}')
    for name, alpha in (('mixup_alpha', mixup_alpha), ('cutmix_alpha', cutmix_alpha)):
      if alpha < 0:
        raise ValueError(f'MixupCutmix {name} must be >= 0 (0 disables it), got {alpha}')
    for name, p in (('switch_prob', switch_prob), ('prob', prob)):
      if not 0 <= p <= 1:
        raise ValueError(f'MixupCutmix {name} must be in [0, 1], got {p}')
    if not 0 <= label_smoothing < 1:
      raise ValueError(f'MixupCutmix label_smoothing must be in [0, 1), got {label_smoothing}')
    self.num_classes = int(num_classes)
    self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
    self.switch_prob, self.prob = float(switch_prob), float(prob)
    self.label_smoothing = float(label_smoothing)

  def mix_params(self, rng: np.random.Generator, height, width) -> MixParams:
    """This batch's draw: ``MixParams(mode, lam, box)`` (box only for CutMix)."""
    u = rng.random(NUM_UNIFORMS)
    # Both Beta draws happen whenever the alpha is set, so switch_prob and prob
    # change only their own decisions.
    lam_mixup = float(rng.beta(self.mixup_alpha, self.mixup_alpha)) if self.mixup_alpha > 0 else 1.0
    lam_cutmix = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha)) if self.cutmix_alpha > 0 else 1.0
    if not (self.mixup_alpha > 0 or self.cutmix_alpha > 0) or u[U_APPLY] >= self.prob:
      return MixParams('none', 1.0, None)
    if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
      use_cutmix = u[U_SWITCH] < self.switch_prob
    else:
      use_cutmix = self.cutmix_alpha > 0
    if not use_cutmix:
      return MixParams('mixup', lam_mixup, None)
    centre = (min(int(u[U_CENTRE_Y] * height), height - 1), min(int(u[U_CENTRE_X] * width), width - 1))
    box, lam = cutmix_box(lam_cutmix, height, width, centre)
    return MixParams('cutmix', lam, box)

  def _check(self, images, labels):
    if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
      raise ValueError(f'MixupCutmix needs image [B, H, W, C] and label [B], got shapes '
                       f'{images.shape} and {labels.shape}')
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f'MixupCutmix needs integer class labels, got dtype {labels.dtype}')
    if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise ValueError(f'MixupCutmix labels must be in [0, {self.num_classes}), got '
                       f'min {labels.min()} max {labels.max()}')

  def random_map(self, batch, rng: np.random.Generator):
    images, labels = np.asarray(batch['image']), np.asarray(batch['label'])
    self._check(images, labels)
    mode, lam, box = self.mix_params(rng, images.shape[1], images.shape[2])
    if mode == 'mixup':
      images = mixup_images(images, lam)
    elif mode == 'cutmix':
      images = cutmix_images(images, box)
    result = dict(batch)
    result['image'] = images
    result['targets'] = mix_targets(labels, self.num_classes, lam, self.label_smoothing)
    return result
