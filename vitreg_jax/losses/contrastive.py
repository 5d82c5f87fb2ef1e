"""CLIP (softmax) and SigLIP (sigmoid) image-text losses over the global batch.

Every image is scored against every text of the *global* batch, and the
gradient must be that of the global-batch loss: what OpenCLIP computes with
``--local-loss --gather-with-grad`` and big_vision with jit over the global
arrays (REFERENCE §4, §10). With ``z = exp(log_scale) * img @ txt.T + bias``
over the global batch ``B`` and positives ``z_ii`` on the diagonal:

* softmax: ``(1/2 sum_i lse_j z_ij + 1/2 sum_j lse_i z_ij - sum_i z_ii) / B``,
  i.e. the mean of the image-row and text-row cross-entropies;
* sigmoid: ``sum_ij -log_sigmoid((2I - 1)_ij z_ij) / B``
  ``= (sum_ij softplus(z_ij) - sum_i z_ii) / B`` (as ``-log_sigmoid(-z) =
  softplus(z)`` and ``-log_sigmoid(z) = softplus(z) - z``).

Both are a sum over all pairs that treats every pair alike, minus the
positives computed from the paired rows alone; so a block of logits needs no
labels and no diagonal, and per-row terms are subtracted before summing
(float32 keeps the loss's digits). Two implementations give the same value and
gradients:

* ``plain``: the formula over the global arrays under ``jit``. With inputs
  sharded over the batch XLA gathers the texts and each device holds ``B/W``
  rows of the ``B x B`` logits (``W`` devices on the batch axes): ``B^2 / W``
  logits and the gathered ``B x E`` texts per device.
* ``chunked``: a ``shard_map`` ring over the batch mesh axes. Images stay on
  their device; text shards move to the right neighbour ``W - 1`` times, so
  one ``B/W x B/W`` block of logits is live at a time. Softmax image rows keep
  a running logsumexp; each text shard carries its own running logsumexp
  around the ring, and one last hop brings it home, where the backward pass
  needs it. A ``custom_vjp`` runs the ring again to recompute the blocks and
  sends each text shard's gradient home the same way, so nothing of size
  ``B x B / W`` or ``B x E`` is ever stored.
"""

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from vitreg_jax.parallel.rules import BATCH_MESH_AXES

KINDS = ('softmax', 'sigmoid')
IMPLS = ('plain', 'chunked')


def _logits(img, txt, scale, bias):
  return scale * img @ txt.T + bias


def _positive_logits(img, txt, scale, bias):
  return scale * jnp.sum(img * txt, axis=-1) + bias


def _plain_loss(kind, img, txt, log_scale, bias, logits_sharding):
  scale = jnp.exp(log_scale)
  logits = _logits(img, txt, scale, bias)
  if logits_sharding is not None:
    logits = jax.lax.with_sharding_constraint(logits, logits_sharding)
  if kind == 'sigmoid':
    per_pair = jnp.sum(jax.nn.softplus(logits), axis=1)
  else:
    per_pair = 0.5 * (jax.nn.logsumexp(logits, axis=1) + jax.nn.logsumexp(logits, axis=0))
  # Row by row first: a sum of B terms near the logits' size minus another
  # would lose the loss's digits in float32.
  return jnp.mean(per_pair - _positive_logits(img, txt, scale, bias))


def _shift_right(tree, axes, ring):
  perm = [(i, (i + 1) % ring) for i in range(ring)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, axes, perm), tree)


def _around_ring(visit, state, travelling, axes, ring):
  """Folds ``visit(state, travelling) -> (state, travelling)`` over all ``ring`` shards.

  First the local shard, then ``ring - 1`` times the one arriving from the left
  neighbour. On return each device holds the travelling shard of its right
  neighbour (one ``_shift_right`` away from home).
  """
  state, travelling = visit(state, travelling)

  def step(carry, _):
    state, travelling = carry
    return visit(state, _shift_right(travelling, axes, ring)), None

  (state, travelling), _ = jax.lax.scan(step, (state, travelling), length=ring - 1)
  return state, travelling


def _ring_forward(kind, axes, img, txt, log_scale, bias):
  """Per-device loss and, for softmax, the home shards' row / column logsumexps."""
  ring = jax.lax.axis_size(axes)
  global_batch = img.shape[0] * ring
  scale = jnp.exp(log_scale)
  positives = _positive_logits(img, txt, scale, bias)

  if kind == 'sigmoid':
    def visit_sigmoid(row_sums, txt_shard):
      logits = _logits(img, txt_shard, scale, bias)
      return row_sums + jnp.sum(jax.nn.softplus(logits), axis=1), txt_shard

    row_sums, _ = _around_ring(visit_sigmoid, jnp.zeros_like(positives), txt, axes, ring)
    return jax.lax.psum(jnp.sum(row_sums - positives), axes) / global_batch, ()

  def visit_softmax(img_lse, travelling):
    txt_shard, txt_lse = travelling
    logits = _logits(img, txt_shard, scale, bias)
    img_lse = jnp.logaddexp(img_lse, jax.nn.logsumexp(logits, axis=1))
    txt_lse = jnp.logaddexp(txt_lse, jax.nn.logsumexp(logits, axis=0))
    return img_lse, (txt_shard, txt_lse)

  # Running logsumexps start empty (-inf): logaddexp(-inf, x) = x.
  empty = jnp.full(img.shape[:1], -jnp.inf, img.dtype)
  img_lse, (_, txt_lse) = _around_ring(visit_softmax, empty, (txt, empty), axes, ring)
  txt_lse = _shift_right(txt_lse, axes, ring)
  local = jnp.sum(0.5 * (img_lse + txt_lse) - positives)  # row by row: see _plain_loss
  return jax.lax.psum(local, axes) / global_batch, (img_lse, txt_lse)


def _ring_backward(kind, axes, img, txt, log_scale, bias, lse, loss_grad):
  """Per-device gradients w.r.t. ``img, txt, log_scale, bias``, recomputing each block.

  ``d loss / d z_ij`` is ``sigmoid(z_ij)`` (sigmoid) or the mean of the row and
  column softmax probabilities (softmax), minus 1 on the positives, times
  ``loss_grad / B``.
  """
  ring = jax.lax.axis_size(axes)
  coef = loss_grad / (img.shape[0] * ring)
  scale = jnp.exp(log_scale)

  def visit(state, travelling):
    d_img, d_bias = state
    txt_shard, d_txt, *txt_lse = travelling  # softmax: the shard's column logsumexp
    logits = _logits(img, txt_shard, scale, bias)
    if kind == 'sigmoid':
      d_logits = coef * jax.nn.sigmoid(logits)
    else:
      d_logits = (0.5 * coef) * (jnp.exp(logits - lse[0][:, None])
                                 + jnp.exp(logits - txt_lse[0][None, :]))
    d_img = d_img + scale * d_logits @ txt_shard
    d_txt = d_txt + scale * d_logits.T @ img
    return (d_img, d_bias + jnp.sum(d_logits)), (txt_shard, d_txt, *txt_lse)

  # The positives' share (-coef per pair) seeds both accumulators.
  state = (-coef * scale * txt, -coef * img.shape[0])
  travelling = (txt, -coef * scale * img, *lse[1:])
  (d_img, d_bias), (_, d_txt, *_) = _around_ring(visit, state, travelling, axes, ring)
  d_txt = _shift_right(d_txt, axes, ring)
  # Every logit is linear in scale, so d/d log_scale = sum_ij dz_ij * (z_ij - bias)
  # = sum_i <img_i, d_img_i>.
  d_log_scale = jax.lax.psum(jnp.sum(img * d_img), axes)
  return d_img, d_txt, d_log_scale, jax.lax.psum(d_bias, axes)


@functools.lru_cache(maxsize=32)  # one trace per configuration when called eagerly
def _chunked_loss(kind, mesh, axes):
  """``loss(img, txt, log_scale, bias)`` over global arrays: a ring with its own VJP."""
  rows = P(axes)
  lse_specs = (rows, rows) if kind == 'softmax' else ()
  forward = jax.shard_map(functools.partial(_ring_forward, kind, axes), mesh=mesh,
                          in_specs=(rows, rows, P(), P()), out_specs=(P(), lse_specs))
  backward = jax.shard_map(functools.partial(_ring_backward, kind, axes), mesh=mesh,
                           in_specs=(rows, rows, P(), P(), lse_specs, P()),
                           out_specs=(rows, rows, P(), P()))

  @jax.custom_vjp
  def loss(img, txt, log_scale, bias):
    return forward(img, txt, log_scale, bias)[0]

  def loss_fwd(img, txt, log_scale, bias):
    value, lse = forward(img, txt, log_scale, bias)
    return value, (img, txt, log_scale, bias, lse)

  def loss_bwd(residuals, loss_grad):
    return backward(*residuals, loss_grad)

  loss.defvjp(loss_fwd, loss_bwd)
  return loss


def _resolve_mesh(mesh):
  if mesh is not None:
    return mesh
  context = jax.sharding.get_abstract_mesh()
  return None if context.empty else context


def _batch_axes(batch_axes: str | Sequence[str], mesh) -> tuple[str, ...]:
  axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f'batch_axes {missing} are not axes of the mesh {tuple(mesh.axis_names)}')
  return axes


def contrastive_loss(kind: str, img: jax.Array, txt: jax.Array, log_scale: jax.Array,
                     bias: jax.Array | None = None, *, impl: str = 'plain', mesh=None,
                     batch_axes: str | Sequence[str] = BATCH_MESH_AXES) -> jax.Array:
  """Scalar image-text loss over the global batch (float32); exact global gradients.

  Args:
    kind: ``'softmax'`` (CLIP) or ``'sigmoid'`` (SigLIP).
    img: ``[B, E]`` L2-normalised image embeddings, ``B`` the global batch.
    txt: ``[B, E]`` L2-normalised text embeddings, row ``i`` pairs with image ``i``.
    log_scale: scalar (or shape ``(1,)``) log of the logit scale (``t`` in big_vision).
    bias: scalar logit bias, or ``None`` for none (CLIP usually; it cancels in softmax).
    impl: ``'plain'`` (global logits, XLA gathers) or ``'chunked'`` (ring, one block live).
    mesh: ``Mesh`` or ``AbstractMesh`` the batch is sharded on; default the context
      mesh (``jax.set_mesh`` / ``parallel.rules.activate``). ``'chunked'`` needs one;
      ``'plain'`` uses it only to keep the logits sharded by rows.
    batch_axes: mesh axis (or axes, flattened in order) the batch is sharded over.
  """
  if kind not in KINDS:
    raise ValueError(f'unknown contrastive loss kind {kind!r}; valid: {list(KINDS)}')
  if impl not in IMPLS:
    raise ValueError(f'unknown contrastive loss impl {impl!r}; valid: {list(IMPLS)}')
  if img.ndim != 2 or img.shape != txt.shape:
    raise ValueError(f'img and txt must both be [B, E], got {img.shape} and {txt.shape}')
  if math.prod(jnp.shape(log_scale)) != 1:
    raise ValueError(f'log_scale must be a scalar, got shape {jnp.shape(log_scale)}')
  if bias is not None and math.prod(jnp.shape(bias)) != 1:
    raise ValueError(f'bias must be a scalar or None, got shape {jnp.shape(bias)}')
  img, txt = img.astype(jnp.float32), txt.astype(jnp.float32)
  log_scale = jnp.reshape(log_scale, ()).astype(jnp.float32)
  bias = jnp.zeros((), jnp.float32) if bias is None else jnp.reshape(bias, ()).astype(jnp.float32)

  mesh = _resolve_mesh(mesh)
  axes = None if mesh is None else _batch_axes(batch_axes, mesh)
  ring = 1 if mesh is None else math.prod(mesh.shape[a] for a in axes)
  global_batch = img.shape[0]
  if impl == 'plain':
    by_rows = None
    if mesh is not None and global_batch % ring == 0:
      by_rows = NamedSharding(mesh, P(axes, None))
    return _plain_loss(kind, img, txt, log_scale, bias, by_rows)
  if mesh is None:
    raise ValueError("impl='chunked' needs a mesh: pass mesh= or set one with jax.set_mesh")
  if global_batch % ring:
    raise ValueError(
        f"impl='chunked': global batch {global_batch} does not divide over the {ring} devices "
        f'of mesh axes {axes}; use a batch that is a multiple of {ring}')
  return _chunked_loss(kind, mesh, axes)(img, txt, log_scale, bias)
