"""Test-time registers (Jiang, Dravid, Efros, Gandelsman 2025; REFERENCE §11): find the MLP
"register neurons" that create high-norm outliers, save them, apply them to any ViT.

Search (``find``), on the unmodified model: outliers are the tokens (cls
included) whose block output at ``detect_layer`` has L2 norm above
``threshold``; images without any are skipped. For each image, the score of
``(layer, neuron)`` is the mean ``|activation|`` (MLP hidden, after the
nonlinearity) over its outlier tokens; the optional sparsity filter zeroes a
score unless the neuron is below 0.5 on at least half of the image's tokens.
Scores are averaged over images, all pairs sorted descending, layers above
``highest_layer`` dropped, the ``top_k`` kept and grouped by layer. Batched
with per-image reductions (the official code runs batch 1).

The result is saved and applied by :mod:`vitreg_jax.models.test_time_registers`
(``save``; ``apply(model, spec)``, ``convert.load(..., tt_registers=spec)``).
"""

import jax
import jax.numpy as jnp
import numpy as np

from vitreg_jax.models import vit

SPARSITY_ACTIVATION = 0.5   # "inactive" below this ...
SPARSITY_SHARE = 0.5        # ... on at least this share of the image's tokens


def _scores(model, variables, images, detect_layer: int, threshold: float, sparsity: bool):
  """Per image: ``score [B, L, hidden]`` (0 for images without outliers), ``has [B]``."""
  out, state = model.apply(variables, images, return_layers=True, mutable=['intermediates'])
  inter = state['intermediates']
  hidden = vit.block_intermediates(inter, 'hidden', module='mlp').astype(jnp.float32)  # [L,B,T,H]
  out = out['layers'][detect_layer]
  outliers = jnp.linalg.norm(out.astype(jnp.float32), axis=-1) > threshold        # [B, T]
  count = outliers.sum(-1)                                                        # [B]
  total = jnp.einsum('lbth,bt->blh', jnp.abs(hidden), outliers.astype(jnp.float32))
  score = total / jnp.maximum(count, 1)[:, None, None]
  if sparsity:
    inactive = (hidden < SPARSITY_ACTIVATION).mean(axis=2)                        # [L, B, H]
    score = jnp.where(jnp.transpose(inactive, (1, 0, 2)) >= SPARSITY_SHARE, score, 0.0)
  return score, count > 0


def neuron_scores(model, variables, batches, *, detect_layer: int, threshold: float,
                  sparsity_filter: bool = False, max_images: int = 0) -> tuple[np.ndarray, int]:
  """Mean score ``[L, hidden]`` over the images with outliers, and how many had some."""
  step = jax.jit(lambda v, x: _scores(model, v, x, detect_layer, threshold, sparsity_filter))
  total, images, seen = None, 0, 0
  for batch in batches:
    score, has = (np.asarray(a) for a in step(variables, batch['image']))
    valid = np.asarray(batch.get('valid', np.ones(len(has))), bool)
    if max_images:
      valid &= np.arange(len(valid)) < max_images - seen
    seen += int(valid.sum())
    keep = has & valid
    part = score[keep].astype(np.float64).sum(axis=0)
    total = part if total is None else total + part
    images += int(keep.sum())
    if max_images and seen >= max_images:
      break
  if not images:
    raise ValueError(f'no image has a token above norm {threshold} at layer {detect_layer}: '
                     'lower the threshold or pick another detect layer (artifacts.py shows '
                     'the norms per layer)')
  return total / images, images


def rank(scores: np.ndarray, *, highest_layer: int, top_k: int) -> list[tuple[int, int, float]]:
  """``(layer, neuron, score)`` of the ``top_k`` highest scores in layers <= ``highest_layer``.

  Ties keep (layer, neuron) order (a stable sort of the negated scores).
  """
  scores = np.asarray(scores)
  order = np.argsort(-scores.ravel(), kind='stable')
  layers, neurons = np.unravel_index(order, scores.shape)
  picked = [(int(l), int(n), float(scores[l, n])) for l, n in zip(layers, neurons)
            if l <= highest_layer]
  return picked[:top_k]


def group(ranked) -> dict[int, list[int]]:
  """``{layer: [neurons in rank order]}``, layers ascending."""
  grouped: dict[int, list[int]] = {}
  for layer, neuron, _ in ranked:
    grouped.setdefault(layer, []).append(neuron)
  return dict(sorted(grouped.items()))
