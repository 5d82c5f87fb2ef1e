"""Attention for CPU: one image at a time, probabilities recomputed in the backward pass.

XLA:CPU runs batched attention dots poorly and, differentiating a ``lax.map``
over images, stores every image's ``[H, T, T]`` probabilities for the backward
pass (52 MB per ViT-S layer at batch 32) and reads them back from memory. This
is the flash-attention schedule at the granularity that suits a CPU cache:
the forward keeps, per image, only the output and the log-sum-exp ``[H, T]``
of each query's logits; the backward (a ``custom_vjp``) recomputes that image's
probabilities from ``q, k`` and the log-sum-exp while they are in cache, then
forms ``dv = P^T dO``, ``dS = P * (dO V^T - rowsum(dO * O))``, ``dq = dS K``,
``dk = dS^T Q`` (scaled). Same maths as ``attention._xla``; logits and
softmax statistics in float32. ``causal``: key ``j > i`` masked for query ``i``.
"""

import functools

import jax
import jax.numpy as jnp


def mask_future(logits):
  """Logits ``[..., Q, K]`` with key ``j > i`` of query ``i`` set to ``-inf``."""
  q, k = logits.shape[-2:]
  keep = jnp.arange(k)[None, :] <= jnp.arange(q)[:, None]
  return jnp.where(keep, logits, -jnp.inf)


def _logits(q, k, causal):
  """``[H, Q, K]`` float32 scaled logits of one image (``q, k [T, H, hd]``)."""
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum('qhd,khd->hqk', q * scale, k, preferred_element_type=jnp.float32)
  return mask_future(logits) if causal else logits


def _forward_one(q, k, v, causal):
  logits = _logits(q, k, causal)
  peak = logits.max(-1, keepdims=True)
  shifted = jnp.exp(logits - peak)
  total = shifted.sum(-1)  # [H, Q]
  out = jnp.einsum('hqk,khd->qhd', shifted.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  out = out / total.T[..., None]
  return out.astype(q.dtype), peak[..., 0] + jnp.log(total)


def _backward_one(q, k, v, out, lse, dout, causal):
  probs = jnp.exp(_logits(q, k, causal) - lse[..., None])  # [H, Q, K]
  f32 = jnp.float32
  dv = jnp.einsum('hqk,qhd->khd', probs.astype(dout.dtype), dout, preferred_element_type=f32)
  dprobs = jnp.einsum('qhd,khd->hqk', dout, v, preferred_element_type=f32)
  delta = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1).T  # [H, Q]
  dlogits = probs * (dprobs - delta[..., None])
  scale = q.shape[-1] ** -0.5
  dq = jnp.einsum('hqk,khd->qhd', dlogits.astype(k.dtype), k, preferred_element_type=f32) * scale
  dk = jnp.einsum('hqk,qhd->khd', dlogits.astype(q.dtype), q, preferred_element_type=f32) * scale
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention(q, k, v, causal=False):
  """``out [B, T, H, hd]`` of ``q, k, v [B, T, H, hd]``; one image per loop step."""
  return _forward(q, k, v, causal)[0]


def _forward(q, k, v, causal):
  return jax.lax.map(lambda x: _forward_one(*x, causal), (q, k, v))


def _attention_fwd(q, k, v, causal):
  out, lse = _forward(q, k, v, causal)
  return out, (q, k, v, out, lse)


def _attention_bwd(causal, residuals, dout):
  return jax.lax.map(lambda x: _backward_one(*x, causal), (*residuals, dout))


attention.defvjp(_attention_fwd, _attention_bwd)
