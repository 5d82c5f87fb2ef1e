"""The paper's figures as PNG files (matplotlib, headless): histograms, per-layer norms,
attention overlays, LOST boxes. Each function writes one file and returns its path."""

import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after the backend)
import numpy as np  # noqa: E402


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)
  return path


def norm_histogram(path: str, series: dict, cutoff: float | None = None, title: str = '') -> str:
  """Fig. 3: histograms of token norms (``series``: label -> norms), log x, cutoff marked."""
  fig, ax = plt.subplots(figsize=(6, 3.5))
  values = [np.asarray(v, np.float64).ravel() for v in series.values()]
  low = max(min(v.min() for v in values if v.size), 1e-6)
  high = max(v.max() for v in values if v.size)
  bins = np.geomspace(low, max(high, low * 1.01), 80)
  for (label, _), v in zip(series.items(), values):
    ax.hist(v, bins=bins, alpha=0.6, label=label)
  if cutoff is not None:
    ax.axvline(cutoff, color='k', ls='--', label=f'cutoff {cutoff:.3g}')
  ax.set(xscale='log', yscale='log', xlabel='L2 norm', ylabel='tokens', title=title)
  ax.legend(fontsize=8)
  return _save(fig, path)


def layer_norms(path: str, rows: list[dict], title: str = '') -> str:
  """Fig. 4a: per block, the patch-norm percentiles and the registers' median."""
  layers = [r['layer'] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  pct = lambda key, q: [r[key].get(f'p{q}', np.nan) for r in rows]
  ax.fill_between(layers, pct('patch_norms', 1), pct('patch_norms', 99), alpha=0.25,
                  label='patches p1-p99')
  ax.plot(layers, pct('patch_norms', 50), label='patches median')
  ax.plot(layers, [r['patch_norms'].get('max', np.nan) for r in rows], ':', label='patches max')
  if rows and rows[0]['register_norms'].get('count'):
    ax.plot(layers, pct('register_norms', 50), label='registers median')
  ax.set(yscale='log', xlabel='block', ylabel='L2 norm (before the final norm)', title=title)
  ax.legend(fontsize=8)
  return _save(fig, path)


def denormalise(image, mean, std) -> np.ndarray:
  """A normalised HWC float image back to [0, 1] for display."""
  return np.clip(np.asarray(image) * np.asarray(std) + np.asarray(mean), 0, 1)


def overlay_grid(path: str, image: np.ndarray, maps: dict, title: str = '',
                 columns: int = 0) -> str:
  """The image next to each map (``maps``: label -> [gh, gw]) overlaid on it (Fig. 1, 9);
  ``columns`` maps per row after the image's (0: one row)."""
  columns = columns or len(maps)
  rows = -(-len(maps) // columns)
  fig, axes = plt.subplots(rows, 1 + columns, figsize=(2.2 * (1 + columns), 2.4 * rows),
                           squeeze=False)
  for ax in axes[1:, 0]:
    ax.axis('off')
  axes = np.concatenate([axes[:1, 0], axes[:, 1:].ravel()])
  h, w = image.shape[:2]
  axes[0].imshow(image)
  axes[0].set_title('image', fontsize=8)
  for ax, (label, grid) in zip(axes[1:], maps.items()):
    ax.imshow(image)
    ax.imshow(np.asarray(grid), cmap='inferno', alpha=0.65, extent=(0, w, h, 0),
              interpolation='nearest')
    ax.set_title(label, fontsize=8)
  for ax in axes:
    ax.axis('off')
  if title:
    fig.suptitle(title, fontsize=9)
  return _save(fig, path)


def boxes(path: str, image: np.ndarray, predicted, ground_truth, title: str = '') -> str:
  """The LOST box (red) and the ground-truth boxes (green) on the image."""
  fig, ax = plt.subplots(figsize=(3.5, 3.5))
  ax.imshow(image)
  for box, colour in [(b, 'lime') for b in np.asarray(ground_truth).reshape(-1, 4)] + [
      (np.asarray(predicted), 'red')]:
    x0, y0, x1, y1 = box
    ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour, lw=2))
  ax.set_title(title, fontsize=8)
  ax.axis('off')
  return _save(fig, path)


def line_plot(path: str, x, series: dict, xlabel: str, ylabel: str, title: str = '') -> str:
  """One line per entry of ``series`` over ``x`` (register ablation, Fig. 8)."""
  fig, ax = plt.subplots(figsize=(5, 3.2))
  for label, ys in series.items():
    ax.plot(x, ys, 'o-', label=label)
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  ax.legend(fontsize=8)
  return _save(fig, path)
