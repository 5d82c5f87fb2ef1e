"""High-norm artifact tokens: cutoffs, outliers, where they sit, what they carry (REFERENCE §5).

The paper's signal is the L2 norm of output patch tokens *before* the final
norm: bimodal in large models trained without registers (cutoff 150 for
DINOv2 ViT-g, 2.37% of the tokens above). The cutoff is model specific, so
besides a given one this module finds it at the valley of the distribution:

``valley_cutoff`` histograms ``log(norm)`` (outliers are ~10x the normal norm,
a constant gap on a log scale whatever the model's width), smooths it, and
takes the lowest point between the main mode and the most prominent mode
*above* it holding at least 0.5% of the tokens. A distribution without such
a second mode has no cutoff (None):
no outliers, which is what registers should give.

Everything here is NumPy over the host arrays of the feature pass.
"""

import numpy as np

BINS = 128
SMOOTH_BINS = 2.0       # Gaussian smoothing of the log-norm histogram, in bins
MIN_PROMINENCE = 0.5    # the valley must be below half the second mode's height
MIN_MASS = 0.005        # ... and the second mode hold >= 0.5% of the tokens (not a noisy tail)
PERCENTILES = (1, 25, 50, 75, 99)


def _smoothed_histogram(values: np.ndarray, bins: int, sigma: float):
  counts, edges = np.histogram(values, bins=bins)
  radius = int(np.ceil(3 * sigma))
  kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  smooth = np.convolve(np.pad(counts.astype(np.float64), radius), kernel / kernel.sum(), 'valid')
  return smooth, edges


def valley_cutoff(norms, *, bins: int = BINS, smooth_bins: float = SMOOTH_BINS,
                  min_prominence: float = MIN_PROMINENCE,
                  min_mass: float = MIN_MASS) -> float | None:
  """The norm at the valley between the main mode and a high-norm mode, or None if unimodal."""
  values = np.log(np.maximum(np.asarray(norms, np.float64).ravel(), 1e-12))
  if values.size < 2 or values.max() - values.min() < 1e-9:
    return None
  smooth, edges = _smoothed_histogram(values, bins, smooth_bins)
  centres = 0.5 * (edges[:-1] + edges[1:])
  main = int(np.argmax(smooth))
  best, best_prominence = None, 0.0
  for peak in range(main + 1, len(smooth)):
    left = smooth[peak - 1]
    right = smooth[peak + 1] if peak + 1 < len(smooth) else -np.inf
    if not (smooth[peak] > 0 and smooth[peak] >= left and smooth[peak] >= right):
      continue
    between = smooth[main:peak + 1]
    valley = float(between.min())
    if valley > min_prominence * smooth[peak]:
      continue
    lowest = np.flatnonzero(between == valley)  # a flat (empty) gap: its middle
    split = main + int(round(0.5 * (lowest[0] + lowest[-1])))
    prominence = smooth[peak] - valley
    if prominence > best_prominence and (values > edges[split + 1]).mean() >= min_mass:
      best, best_prominence = split, prominence
  return None if best is None else float(np.exp(centres[best]))


def outlier_mask(norms, cutoff: float | None) -> np.ndarray:
  """``norms > cutoff`` (all False without a cutoff)."""
  norms = np.asarray(norms)
  return np.zeros(norms.shape, bool) if cutoff is None else norms > cutoff


def border_mask(grid: tuple[int, int]) -> np.ndarray:
  """[gh * gw] True on the first/last row or column of the patch grid."""
  gh, gw = grid
  mask = np.zeros((gh, gw), bool)
  mask[[0, -1], :] = True
  mask[:, [0, -1]] = True
  return mask.ravel()


def background_mask(boxes, grid: tuple[int, int]) -> np.ndarray:
  """[gh * gw] True where the patch centre lies outside every box (x0, y0, x1, y1 in [0, 1])."""
  gh, gw = grid
  cy, cx = np.meshgrid((np.arange(gh) + 0.5) / gh, (np.arange(gw) + 0.5) / gw, indexing='ij')
  inside = np.zeros((gh, gw), bool)
  for x0, y0, x1, y1 in np.asarray(boxes, np.float64).reshape(-1, 4):
    inside |= (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
  return ~inside.ravel()


def distribution(values) -> dict:
  """Mean, std, max and percentiles of ``values``."""
  values = np.asarray(values, np.float64).ravel()
  if not values.size:
    return {'count': 0}
  stats = {'count': int(values.size), 'mean': float(values.mean()), 'std': float(values.std()),
           'max': float(values.max())}
  stats.update({f'p{q}': float(v) for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))})
  return stats


def where_outliers_sit(outliers: np.ndarray, grid: tuple[int, int], boxes=None) -> dict:
  """Share of outliers on the grid border / in the background, against all patches' share.

  ``outliers [n_images, gh * gw]``; ``boxes``: per image [k, 4] normalised, or None.
  """
  border = border_mask(grid)
  result = {'outliers_on_border': _share(outliers, np.broadcast_to(border, outliers.shape)),
            'patches_on_border': float(border.mean())}
  if boxes is not None:
    background = np.stack([background_mask(b, grid) for b in boxes])
    has_boxes = np.array([len(np.asarray(b).reshape(-1, 4)) > 0 for b in boxes])
    if has_boxes.any():
      result['outliers_in_background'] = _share(outliers[has_boxes], background[has_boxes])
      result['patches_in_background'] = float(background[has_boxes].mean())
  return result


def _share(selected: np.ndarray, where: np.ndarray) -> float | None:
  total = int(selected.sum())
  return float((selected & where).sum() / total) if total else None


def patch_statistics(patch_norms, cutoff: float | None, grid, boxes=None,
                     neighbour_cos=None) -> dict:
  """Outlier fraction, their place, and (Fig. 5a) their input redundancy, for one layer's norms.

  ``patch_norms [n_images, N]``; ``neighbour_cos [n_images, N]`` the patch
  embeddings' cosine with their 4 neighbours.
  """
  outliers = outlier_mask(patch_norms, cutoff)
  stats = {'cutoff': cutoff, 'outlier_fraction': float(outliers.mean()),
           'images_with_outliers': float(outliers.any(axis=1).mean()),
           'norms': distribution(patch_norms),
           'outlier_norms': distribution(np.asarray(patch_norms)[outliers]),
           'normal_norms': distribution(np.asarray(patch_norms)[~outliers])}
  stats.update(where_outliers_sit(outliers, grid, boxes))
  if neighbour_cos is not None:
    cos = np.asarray(neighbour_cos)
    stats['neighbour_cosine_outliers'] = distribution(cos[outliers])
    stats['neighbour_cosine_normal'] = distribution(cos[~outliers])
  return stats


def per_layer(layer_norms, where: dict) -> list[dict]:
  """Fig. 4a: for each block, the patch-norm distribution, its own valley cutoff and outliers,
  and the (test-time) registers' norms. ``layer_norms [L, n_images, T]`` (before the final
  norm); ``where``: the model's ``token_slices()``."""
  rows = []
  for depth, norms in enumerate(np.asarray(layer_norms)):
    patches = norms[:, where['patches']]
    cutoff = valley_cutoff(patches)
    row = {'layer': depth + 1, 'cutoff': cutoff,
           'outlier_fraction': float(outlier_mask(patches, cutoff).mean()),
           'patch_norms': distribution(patches),
           'register_norms': distribution(norms[:, where['registers']])}
    if where['test_time_registers'].stop > where['test_time_registers'].start:
      row['test_time_register_norms'] = distribution(norms[:, where['test_time_registers']])
    rows.append(row)
  return rows


def register_statistics(register_norms, patch_norms, cutoff: float | None) -> dict:
  """Fig. 15: each register's norm against the patches' (``register_norms [n, R]``)."""
  register_norms = np.asarray(register_norms)
  if not register_norms.size:
    return {'num_registers': 0}
  return {'num_registers': int(register_norms.shape[1]),
          'per_register': [distribution(column) for column in register_norms.T],
          'above_patch_cutoff': float(outlier_mask(register_norms, cutoff).mean()),
          'ratio_to_median_patch': float(np.median(register_norms) /
                                         max(float(np.median(patch_norms)), 1e-12))}
