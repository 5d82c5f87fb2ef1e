"""The LOST datasets and their box conventions (REFERENCE §12).

| paper set | tfds | split | images |
|---|---|---|---|
| VOC07 | ``voc/2007`` | ``train+validation`` | 5,011 |
| VOC12 | ``voc/2012`` | ``train+validation`` | 11,540 |
| COCO20k | ``coco/2014`` | ``train``, filtered by ``data/coco_20k_filenames.txt.gz`` | 19,817 |

tfds boxes are normalised; LOST's ground truth, in pixels of the unpadded image:

* VOC: the XML's 1-based inclusive integers with 1 subtracted from xmin and
  ymin only (tfds stores the raw values / size, so pixels = round(box x size));
* COCO: ``int(round())`` of x, y, x + w, y + h, crowd boxes dropped;
* anything else (the embedded set, folders): the boxes x size as they are.

The COCO20k list is valeoai/LOST's ``datasets/coco_20k_filenames.txt``
(Apache-2.0, 19,817 lines ``train2014/COCO_train2014_<12 digits>.jpg``),
kept gzipped; the ``train2014/`` prefix is stripped to match tfds
``image/filename``.
"""

import gzip
import importlib.resources

import numpy as np

PRESETS = {  # --dataset name -> (tfds name, split, filename filter)
    'voc07': ('voc/2007', 'train+validation', None),
    'voc12': ('voc/2012', 'train+validation', None),
    'coco20k': ('coco/2014', 'train', 'coco20k'),
}


def convention(data: str) -> str:
  """'voc', 'coco' or 'plain' for a ``--data`` string such as ``tfds:voc/2007``."""
  name = data.partition(':')[2] if data.startswith('tfds:') else ''
  return 'voc' if name.startswith('voc') else 'coco' if name.startswith('coco') else 'plain'


def ground_truth(boxes_px, kind: str, crowd=None) -> np.ndarray:
  """LOST's ground-truth boxes [n, 4] from pixel boxes (normalised x unpadded size)."""
  boxes = np.asarray(boxes_px, np.float64).reshape(-1, 4)
  if kind == 'voc':
    boxes = np.round(boxes)
    boxes[:, :2] -= 1
  elif kind == 'coco':
    if crowd is not None and len(crowd):
      boxes = boxes[~np.asarray(crowd, bool)]
    boxes = np.round(boxes)
  elif kind != 'plain':
    raise ValueError(f"box convention {kind!r}; valid: 'voc', 'coco', 'plain'")
  return boxes


def coco20k_filenames() -> frozenset:
  """The 19,817 COCO 2014 train file names of COCO20k (tfds ``image/filename`` form)."""
  data = importlib.resources.files('vitreg_jax.analysis').joinpath(
      'data/coco_20k_filenames.txt.gz').read_bytes()
  lines = gzip.decompress(data).decode('utf-8').split()
  return frozenset(line.rpartition('/')[2] for line in lines)


def selected_indices(source, filenames: frozenset | None) -> list[int]:
  """Indices of ``source`` to evaluate: all, or those whose ``filename`` is listed."""
  if filenames is None:
    return list(range(len(source)))
  picked = [i for i in range(len(source)) if source[i].get('filename') in filenames]
  if not picked:
    raise ValueError(f'none of the {len(source)} records has a file name in the list '
                     f'({len(filenames)} names, e.g. {sorted(filenames)[0]})')
  return picked
