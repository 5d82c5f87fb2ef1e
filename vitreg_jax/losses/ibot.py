"""iBOT masked-patch loss, with static shapes for ``jax.jit``.

The reference gathers a variable-length list of masked patches. Under jit
shapes are static, so the loss takes *slots* ``[..., K]`` with per-slot
weights that are zero on slots which do not count. Two layouts fit:

- dense: every patch of every global crop, ``[2, B, N, K]``, weights from
  ``masked_patch_weights(masks)``;
- gathered: ``select_masked_patches`` picks, within groups of images (like the
  reference's per-GPU buffer), the masked patches into a fixed budget of slots
  (``mask_budget`` reproduces the reference ``upperbound``), so the heads run
  on ~1/3 of the patches instead of all. ``gather_patches`` applies the
  selection to student and teacher patch tokens alike.

Pass the same slot validity (``weights > 0``) to ``centering.teacher_probs`` /
``update_center`` so Sinkhorn-Knopp and the centre count masked patches only.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def masked_patch_weights(masks):
  """``1 / (masked patches of the image)`` on masked patches, 0 elsewhere.

  ``masks`` is ``[..., N]`` bool (patches last); the reference's ``masks_weight``.
  """
  m = masks.astype(jnp.float32)
  return m / jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)


def ibot_loss(student_logits, teacher_probs, weights, num_images: int,
              student_temp: float = 0.1):
  """``-sum(weights * sum_k teacher * log_softmax(student / T)) / num_images``.

  ``num_images`` is the global number of global-crop images (``2B``). This is
  the reference's ``forward_masked`` times its scales (``2 x 1/2``), i.e. the
  weighted term of the total loss before ``ibot.loss_weight``. Slots with zero
  weight contribute nothing (their logits only need to be finite).
  """
  if student_logits.shape != teacher_probs.shape:
    raise ValueError(f'student logits {student_logits.shape} != teacher probs {teacher_probs.shape}')
  if weights.shape != student_logits.shape[:-1]:
    raise ValueError(f'weights shape {weights.shape} != slots shape {student_logits.shape[:-1]}')
  log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
  teacher = jax.lax.stop_gradient(teacher_probs).astype(jnp.float32)
  per_slot = jnp.sum(teacher * log_p, axis=-1)
  weights = jax.lax.stop_gradient(weights).astype(jnp.float32)
  return -jnp.sum(jnp.where(weights > 0, weights * per_slot, 0.0)) / num_images


def mask_budget(n_images: int, n_patches: int, mask_ratio_min_max=(0.1, 0.5),
                mask_probability: float = 0.5) -> int:
  """Most masked patches a group of ``n_images`` global crops can hold.

  The reference collate's ``upperbound``: ``int(n_images * p)`` images are
  masked with ratios drawn from consecutive bins of
  ``linspace(min, max, n + 1)``; the bound sums ``int(N * bin_max)``. Valid
  when the data pipeline draws masks per group the same way.
  """
  n_masked_images = int(n_images * mask_probability)
  bins = np.linspace(*mask_ratio_min_max, n_masked_images + 1)
  return int(sum(int(n_patches * p) for p in bins[1:]))


class MaskedPatchSelection(NamedTuple):
  """Fixed-size selection of masked patches, one row of slots per group.

  ``indices [n_groups, budget]`` index the group's flattened
  ``[2, group_size, N]`` patches (crop-major, as the reference's buffer);
  ``valid`` marks used slots; ``weights`` are ``masked_patch_weights`` of the
  selected patches (0 on unused slots); ``n_dropped`` counts masked patches
  that did not fit the budget (should stay 0: log it).
  """
  indices: jax.Array
  valid: jax.Array
  weights: jax.Array
  n_dropped: jax.Array


def _group_patches(x, group_size):
  """``[C, B, N, ...] -> [B / g, C * g * N, ...]`` keeping each group's crops together."""
  c, b, n = x.shape[:3]
  if b % group_size:
    raise ValueError(f'group_size {group_size} does not divide the batch {b}')
  x = x.reshape((c, b // group_size, group_size, n) + x.shape[3:])
  x = jnp.moveaxis(x, 1, 0)
  return x.reshape((b // group_size, c * group_size * n) + x.shape[4:])


def select_masked_patches(masks, group_size: int, budget: int) -> MaskedPatchSelection:
  """Picks each group's masked patches, in order, into ``budget`` slots.

  ``masks`` is ``[2, B, N]`` bool (global crops, images, patches). Groups are
  ``group_size`` consecutive images with both their crops; aligned with the
  device shards of the batch axis they need no cross-device traffic.
  """
  if masks.ndim != 3:
    raise ValueError(f'masks must be [n_global_crops, B, N], got shape {masks.shape}')
  weights = _group_patches(masked_patch_weights(masks), group_size)
  flat = _group_patches(masks, group_size)
  if budget > flat.shape[1]:
    raise ValueError(f'budget {budget} exceeds the {flat.shape[1]} patches of a group')
  order = jnp.argsort(~flat, axis=1, stable=True)[:, :budget]  # masked first, in order
  valid = jnp.take_along_axis(flat, order, axis=1)
  slot_weights = jnp.where(valid, jnp.take_along_axis(weights, order, axis=1), 0.0)
  n_dropped = jnp.sum(flat) - jnp.sum(valid)
  return MaskedPatchSelection(order.astype(jnp.int32), valid, slot_weights, n_dropped)


def gather_patches(tokens, selection: MaskedPatchSelection, group_size: int):
  """``[2, B, N, D]`` patch tokens -> ``[n_groups, budget, D]`` selected slots."""
  if tokens.ndim != 4:
    raise ValueError(f'tokens must be [n_global_crops, B, N, D], got shape {tokens.shape}')
  grouped = _group_patches(tokens, group_size)
  return jnp.take_along_axis(grouped, selection.indices[..., None], axis=1)
