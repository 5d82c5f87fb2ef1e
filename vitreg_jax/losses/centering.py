"""Teacher targets for DINO and iBOT: EMA centering or Sinkhorn-Knopp.

Both act on plain ``jnp`` arrays of teacher head logits ``[..., K]`` where every
leading axis indexes samples (crops, images, patch slots). Written for global
arrays under ``jax.jit`` (GSPMD): each mean or sum over the sample axes is a
global reduction, so centres and Sinkhorn-Knopp sums cover the whole batch
across devices, as the reference all-reduces them across GPUs.

``valid`` (bool, the leading shape) marks which samples count; iBOT passes its
masked-patch slots there so that unmasked or padding slots change nothing.
Everything is computed in float32 and carries no gradient (teacher targets).
"""

import jax
import jax.numpy as jnp

CENTERING_MODES = ('centering', 'sinkhorn_knopp')


def _check_valid(logits, valid):
  if valid is not None and valid.shape != logits.shape[:-1]:
    raise ValueError(
        f'valid shape {valid.shape} must equal the logits shape without the prototype '
        f'axis {logits.shape[:-1]}')


def centered_softmax(logits, center, temperature):
  """``softmax((logits - center) / temperature)``: DINO's centred, sharpened target."""
  logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
  center = jnp.asarray(center, jnp.float32)
  if center.shape != logits.shape[-1:]:
    raise ValueError(f'center shape {center.shape} != ({logits.shape[-1]},) prototypes')
  return jax.nn.softmax((logits - center) / temperature, axis=-1)


def update_center(center, logits, momentum: float = 0.9, valid=None):
  """EMA of the mean teacher logit: ``m * center + (1 - m) * mean(logits)``.

  The mean runs over every sample (over the ``valid`` ones only when given),
  i.e. over the global batch. With no valid sample the batch term is zero.

  The reference's iBOT centre is the mean over GPUs of per-GPU means over
  masked patches; this is the mean over all masked patches, which equals it
  on one device and does not depend on the device count.
  """
  logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
  _check_valid(logits, valid)
  # Reduce over the sample axes as they are: a reshape(-1, K) would merge a
  # sharded axis with a replicated one and copy the global logits to each device.
  sample_axes = tuple(range(logits.ndim - 1))
  if valid is None:
    batch_mean = jnp.mean(logits, axis=sample_axes)
  else:
    keep = valid[..., None]
    total = jnp.sum(jnp.where(keep, logits, 0.0), axis=sample_axes)  # where, not 0 * x: x may be garbage
    batch_mean = total / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
  return momentum * jnp.asarray(center, jnp.float32) + (1.0 - momentum) * batch_mean


def _safe_divide(x, denom):
  """``x / denom`` that gives 0 (not NaN) where ``denom == 0``."""
  ok = denom > 0
  return jnp.where(ok, x / jnp.where(ok, denom, 1.0), 0.0)


def sinkhorn_knopp(logits, temperature, n_iterations: int = 3, valid=None):
  """Sinkhorn-Knopp teacher assignments (DINOv2's ``sinkhorn_knopp_teacher``).

  ``Q = exp(logits / T)`` over samples x prototypes, normalised to sum 1, then
  ``n_iterations`` times: each prototype's total to ``1/K``, each sample's to
  ``1/M``; finally scaled so each sample's row sums to 1. ``M`` counts the
  samples (the ``valid`` ones when given: iBOT's number of masked patches),
  across the whole global batch. The global maximum (over valid entries) is
  subtracted before ``exp``: the first normalisation cancels it, and it
  cannot overflow. Invalid samples get all-zero rows: keeping them out of
  the per-prototype sums is what matters, since ``M`` itself is only a global
  scale that the next normalisation (and the final ``* M``) cancels.
  """
  logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
  _check_valid(logits, valid)
  k = logits.shape[-1]
  sample_axes = tuple(range(logits.ndim - 1))
  scaled = logits / temperature
  if valid is None:
    q = jnp.exp(scaled - jnp.max(scaled))
    n_samples = jnp.asarray(logits.size // k, jnp.float32)
  else:
    keep = valid[..., None]
    top = jnp.max(jnp.where(keep, scaled, -jnp.inf))
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # no valid sample at all
    q = jnp.where(keep, jnp.exp(jnp.where(keep, scaled, top) - top), 0.0)
    n_samples = jnp.sum(valid.astype(jnp.float32))
  q = _safe_divide(q, jnp.sum(q))
  for _ in range(n_iterations):
    per_prototype = jnp.sum(q, axis=sample_axes, keepdims=True)
    q = _safe_divide(q, per_prototype) / k
    per_sample = jnp.sum(q, axis=-1, keepdims=True)
    q = _safe_divide(q, per_sample)
    q = _safe_divide(q, n_samples)
  return q * n_samples


def teacher_probs(logits, temperature, mode: str, center=None, valid=None,
                  n_iterations: int = 3):
  """Teacher target distributions in either DINOv2 centering mode.

  ``mode='centering'`` needs ``center`` (the EMA centre *before* this step's
  update); ``'sinkhorn_knopp'`` ignores it. See ``centered_softmax`` and
  ``sinkhorn_knopp``. Unmasked samples get arbitrary (finite) rows in
  centering mode: losses weight them by zero.
  """
  if mode == 'centering':
    if center is None:
      raise ValueError("mode='centering' needs the EMA center")
    return centered_softmax(logits, center, temperature)
  if mode == 'sinkhorn_knopp':
    return sinkhorn_knopp(logits, temperature, n_iterations, valid)
  raise ValueError(f'centering mode {mode!r}; valid: {CENTERING_MODES}')
