"""KoLeo regulariser on student cls tokens (Sablayrolles et al. 2018, DINOv2).

``-mean_i log(||x_i - x_nn(i)|| + eps)`` on L2-normalised rows, nearest
neighbour by largest dot product (self excluded). The reference computes it
within each GPU's local batch; here the batch is cut into groups of
``group_size`` rows (default in configs: the reference per-GPU batch), so the
value does not depend on how many devices run the step, and the group mean
equals the reference's mean over GPUs.

Kept finite with duplicate rows: like torch's ``PairwiseDistance(eps=1e-8)``
the eps is added to the difference before the norm (duplicates get distance
``sqrt(D) * eps``), and both square roots are guarded so gradients never see
``sqrt(0)``. Under ``jit`` XLA fuses the normalisation into the subtraction and
a duplicate's difference comes out ~1e-8 instead of exactly 0, which moves the
loss by ~1e-3 relative; so duplicates are found on the raw rows and their
difference is set to exactly 0 (its gradient is kept: it is the reference's).
"""

import jax
import jax.numpy as jnp

EPS = 1e-8


def _l2_normalize(x, eps):
  """``x / max(||x||, eps)`` with a gradient that stays finite at ``x = 0``."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(sq, eps * eps))


def _safe_norm(d):
  sq = jnp.sum(d * d, axis=-1)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def koleo_loss(x, group_size: int | None = None, eps: float = EPS):
  """KoLeo summed over crops, averaged over groups.

  Args:
    x: ``[n_crops, B, D]`` student backbone cls tokens (the reference uses the 2
      global crops and never pairs two crops of one image).
    group_size: rows per group (``None``: all ``B`` rows form one group); must
      divide ``B`` and be at least 2.
  Returns:
    ``sum_crops mean_groups KoLeo(group)`` in float32 (multiply by the KoLeo
    weight, 0.1, in the train step).
  """
  if x.ndim != 3:
    raise ValueError(f'x must be [n_crops, B, D], got shape {x.shape}')
  n_crops, batch, dim = x.shape
  g = batch if group_size is None else group_size
  if g < 2 or batch % g:
    raise ValueError(
        f'koleo group_size={group_size} must be >= 2 and divide the batch {batch} '
        '(a row needs a neighbour inside its group)')
  raw = x.astype(jnp.float32).reshape(n_crops, batch // g, g, dim)
  x = _l2_normalize(raw, eps)
  dots = jnp.einsum('cngd,cnhd->cngh', x, x, precision=jax.lax.Precision.HIGHEST)
  dots = jnp.where(jnp.eye(g, dtype=bool), -1.0, dots)  # the reference's diagonal fill
  neighbour = jax.lax.stop_gradient(jnp.argmax(dots, axis=-1))
  pick = lambda a: jnp.take_along_axis(a, neighbour[..., None], axis=2)
  difference = x - pick(x)
  duplicate = jax.lax.stop_gradient(jnp.all(raw == pick(raw), axis=-1, keepdims=True))
  # exactly 0 in value for duplicates, the same gradient as the plain difference
  difference = jnp.where(duplicate, difference - jax.lax.stop_gradient(difference), difference)
  distances = _safe_norm(difference + eps)
  per_group = -jnp.mean(jnp.log(distances + eps), axis=-1)  # [n_crops, n_groups]
  return jnp.sum(jnp.mean(per_group, axis=-1))
