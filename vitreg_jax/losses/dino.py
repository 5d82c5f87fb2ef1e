"""DINO cross-entropy between student crops and teacher global crops.

Shapes keep the crop axis explicit: ``[n_crops, B, K]`` with ``B`` the global
number of images (shard the ``B`` axis over the mesh). The teacher sees the 2
global crops only; each student crop is scored against the teacher crops it
does not share a view with, normalised exactly as DINOv2's ``ssl_meta_arch``
(REFERENCE §3):

- local: sum over local crops x 2 teacher crops of ``mean_b CE``,
- global: ``2 x mean`` over both global crops of CE against the *other*
  teacher crop,

both divided by the number of terms ``2 + 2 * n_local``. Without local crops
the reference counts one local term anyway (``max(2 * n_local, 1)``), so the
divisor is 3; that quirk is kept for faithfulness.
"""

import jax
import jax.numpy as jnp

N_GLOBAL_CROPS = 2


def _check_crops(name, x, batch, k):
  if x.ndim != 3 or x.shape[1:] != (batch, k):
    raise ValueError(f'{name} must be [n_crops, B={batch}, K={k}], got shape {x.shape}')


def num_loss_terms(n_local_crops: int) -> int:
  """DINOv2's divisor: global pairs (2) plus local terms (``max(2 * n_local, 1)``)."""
  return (N_GLOBAL_CROPS - 1) * N_GLOBAL_CROPS + max(n_local_crops * N_GLOBAL_CROPS, 1)


def dino_loss(student_global_logits, teacher_global_probs, student_local_logits=None,
              student_temp: float = 0.1):
  """Returns ``(global_loss, local_loss)``, each already divided by the term count.

  Args:
    student_global_logits: ``[2, B, K]`` student head logits of the global crops.
    teacher_global_probs: ``[2, B, K]`` teacher targets of the same crops in the
      same order (``teacher_probs`` output); the crop swap happens here.
    student_local_logits: ``[n_local, B, K]`` or ``None``.
    student_temp: student softmax temperature (0.1).

  The total DINO loss is ``global_loss + local_loss`` (local is 0 without
  local crops). Computed in float32.
  """
  if teacher_global_probs.ndim != 3 or teacher_global_probs.shape[0] != N_GLOBAL_CROPS:
    raise ValueError(
        f'teacher_global_probs must be [2, B, K] (2 global crops), got {teacher_global_probs.shape}')
  _, batch, k = teacher_global_probs.shape
  _check_crops('student_global_logits', student_global_logits, batch, k)
  if student_global_logits.shape[0] != N_GLOBAL_CROPS:
    raise ValueError(f'student_global_logits must hold 2 global crops, got {student_global_logits.shape}')
  teacher = jax.lax.stop_gradient(teacher_global_probs).astype(jnp.float32)
  n_local = 0 if student_local_logits is None else student_local_logits.shape[0]
  terms = num_loss_terms(n_local)

  log_p = jax.nn.log_softmax(student_global_logits.astype(jnp.float32) / student_temp, axis=-1)
  swapped = teacher[::-1]  # student crop c against teacher crop 1 - c
  global_ce = -jnp.sum(swapped * log_p) / (N_GLOBAL_CROPS * batch)
  global_loss = N_GLOBAL_CROPS * global_ce / terms

  if student_local_logits is None:
    return global_loss, jnp.zeros((), jnp.float32)
  _check_crops('student_local_logits', student_local_logits, batch, k)
  log_p_local = jax.nn.log_softmax(student_local_logits.astype(jnp.float32) / student_temp, axis=-1)
  both_teachers = jnp.sum(teacher, axis=0)  # each local crop meets both teacher crops
  local_loss = -jnp.einsum('lbk,bk->', log_p_local, both_teachers) / batch / terms
  return global_loss, local_loss
