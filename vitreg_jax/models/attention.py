"""Scaled dot-product attention, with the formulation chosen per backend.

``q, k, v`` are ``[B, T, H, hd]``. The probabilities are only materialised for
the caller when asked (attention-map analyses); otherwise each backend gets
the formulation that is fastest there:

* ``xla``: einsum + float32 softmax. Portable, what TPU/GPU XLA fuses well.
* ``fused``: ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU,
  the XLA path elsewhere).
* ``auto``: ``fused`` on GPU, ``xla`` otherwise.
"""

import jax
import jax.numpy as jnp

IMPLS = ('auto', 'xla', 'fused')


def _resolve(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f'unknown attention impl {impl!r}; valid: {IMPLS}')
  if impl == 'auto':
    return 'fused' if jax.default_backend() == 'gpu' else 'xla'
  return impl


def attention_probs(q: jax.Array, k: jax.Array) -> jax.Array:
  """``softmax(q k^T / sqrt(hd))`` as ``[B, H, T, T]`` in float32."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bqhd,bkhd->bhqk', q * jnp.asarray(scale, q.dtype), k,
                      preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits, axis=-1)


def dot_product_attention(q, k, v, *, impl: str = 'auto', return_probs: bool = False):
  """Returns ``(out [B, T, H, hd], probs [B, H, T, T] or None)``."""
  impl = _resolve(impl)
  if return_probs or impl == 'xla':
    probs = attention_probs(q, k)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)
    return out, (probs if return_probs else None)
  return jax.nn.dot_product_attention(q, k, v), None
