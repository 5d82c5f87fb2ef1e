"""LOST unsupervised object discovery (Siméoni et al. 2021) and CorLoc (REFERENCE §5, §12).

One box per image from the patch features of one forward pass:

1. ``A = F F^T (+ bias)`` over the patch features ``F`` (cls and registers dropped);
2. degree of a patch = number of *positive* off-diagonal entries in its row;
   the seed is the patch of lowest degree (objects cover fewer patches than
   background, so an object patch correlates positively with fewer others);
3. of the ``k`` lowest-degree patches keep those with ``A[seed, p] > 0`` (the
   seed itself included), score every patch by the sum of their rows;
4. binarise ``score > 0``; the 4-connected component holding the seed is the
   object, its bounding box (in patches, scaled by the patch size and clipped
   to the unpadded image) the prediction.

Ties: the reference sorts degrees with ``torch.argsort``, which is not stable;
here the sort is stable, so among patches of equal degree the one with the
lowest raster index (row-major, top-left first) is the seed and the ``k``
cut keeps lower indices first. If the seed's own score is not positive (the
reference raises; it cannot happen with raw features because
``A[seed, seed] = |f_seed|^2 > 0`` dominates, but it can with a negative
``bias``) the box is the seed patch alone and ``fallback`` is set.

CorLoc: the percentage of images whose box has IoU >= 0.5 with *any*
ground-truth box; IoU without the ``+1`` pixel convention, eps 1e-7 in the
denominator (so an IoU of exactly 0.5 falls just short and misses, as in LOST).
"""

import dataclasses

import numpy as np
import scipy.ndimage

K_PATCHES = 100
CORLOC_IOU = 0.5


@dataclasses.dataclass
class LostResult:
  box: np.ndarray          # [4] x0, y0, x1, y1 in pixels of the unpadded image
  box_patches: tuple       # (ymin, xmin, ymax, xmax) on the patch grid, max exclusive
  seed: int                # raster index of the seed patch
  mask: np.ndarray         # [gh, gw] bool: the seed's connected component
  fallback: bool = False   # the seed's score was not positive (see the module docstring)


def affinity(features: np.ndarray, bias: float = 0.0, normalise: bool = False) -> np.ndarray:
  """``F F^T + bias`` in float64 (``normalise``: L2-normalised features first, Jiang et al.)."""
  f = np.asarray(features, np.float64)
  if normalise:
    f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
  return f @ f.T + bias


def degrees(a: np.ndarray) -> np.ndarray:
  """Positive off-diagonal entries per row."""
  positive = a > 0
  np.fill_diagonal(positive, False)
  return positive.sum(axis=1)


def lost(features, grid: tuple[int, int], patch_size: int, image_size: tuple[int, int], *,
         k_patches: int = K_PATCHES, bias: float = 0.0, normalise: bool = False) -> LostResult:
  """The LOST box of one image from its patch ``features [gh * gw, D]`` (raster order).

  ``image_size``: the unpadded (height, width) in pixels, to clip the box.
  """
  gh, gw = grid
  features = np.asarray(features)
  if features.ndim != 2 or features.shape[0] != gh * gw:
    raise ValueError(f'features must be [patches, dim] with {gh} x {gw} = {gh * gw} patches '
                     f'(cls and registers dropped), got shape {features.shape}')
  a = affinity(features, bias, normalise)
  order = np.argsort(degrees(a), kind='stable')
  seed = int(order[0])
  potentials = order[:k_patches]
  similar = potentials[a[seed, potentials] > 0]
  score = a[similar].sum(axis=0).reshape(gh, gw)
  labelled, _ = scipy.ndimage.label(score > 0)  # default structure: 4-connectivity
  component = labelled[np.unravel_index(seed, (gh, gw))]
  fallback = component == 0
  mask = np.zeros((gh, gw), bool)
  if fallback:
    mask[np.unravel_index(seed, (gh, gw))] = True
  else:
    mask = labelled == component
  rows, cols = np.nonzero(mask)
  ymin, ymax, xmin, xmax = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
  height, width = image_size
  box = np.array([xmin * patch_size, ymin * patch_size,
                  min(xmax * patch_size, width), min(ymax * patch_size, height)], np.float64)
  return LostResult(box, (int(ymin), int(xmin), int(ymax), int(xmax)), seed, mask, bool(fallback))


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """IoU of one ``box`` [4] with each of ``boxes`` [n, 4] (x0, y0, x1, y1; no +1; eps 1e-7)."""
  box, boxes = np.asarray(box, np.float64), np.asarray(boxes, np.float64).reshape(-1, 4)
  ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
  iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
  inter = ix * iy
  area = (box[2] - box[0]) * (box[3] - box[1])
  areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  return inter / (area + areas - inter + 1e-7)


def correct(box, gt_boxes, threshold: float = CORLOC_IOU) -> bool:
  """The box localises the image: IoU >= ``threshold`` with any ground-truth box."""
  gt_boxes = np.asarray(gt_boxes).reshape(-1, 4)
  return bool(len(gt_boxes)) and bool((iou(box, gt_boxes) >= threshold).any())


def corloc(boxes, gt_boxes_per_image, threshold: float = CORLOC_IOU) -> float:
  """CorLoc in percent over the images evaluated (those without GT boxes count as misses)."""
  if len(boxes) != len(gt_boxes_per_image):
    raise ValueError(f'{len(boxes)} predicted boxes for {len(gt_boxes_per_image)} images')
  if not boxes:
    raise ValueError('no images evaluated')
  hits = [correct(b, g, threshold) for b, g in zip(boxes, gt_boxes_per_image)]
  return 100.0 * float(np.mean(hits))
