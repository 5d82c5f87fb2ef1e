"""Token norms: the paper's artifact signal (REFERENCE §5).

High-norm tokens are output patch tokens whose L2 norm exceeds a cutoff (150
for DINOv2 ViT-g). The cutoff is model specific, so besides the fixed-cutoff
fraction this module gives a scale-free variant (norm > ``factor`` x the
median patch norm of the batch) usable as a training metric for any size.
"""

import jax.numpy as jnp


def token_norms(tokens):
  """L2 norm over the last axis, in float32."""
  return jnp.linalg.norm(tokens.astype(jnp.float32), axis=-1)


def high_norm_fraction(patches, *, cutoff: float | None = None, factor: float = 4.0):
  """Fraction of patch tokens ``[..., N, D]`` that are outliers.

  With ``cutoff`` the paper's absolute threshold; otherwise relative to the
  median norm of all patches given.
  """
  norms = token_norms(patches)
  threshold = cutoff if cutoff is not None else factor * jnp.median(norms)
  return jnp.mean(norms > threshold)
