"""Token norms: the paper's artifact signal (REFERENCE §5).

High-norm tokens are output patch tokens whose L2 norm exceeds a cutoff (150
for DINOv2 ViT-g). The cutoff is model specific, so besides the fixed-cutoff
fraction this module gives a scale-free variant (norm > ``factor`` x the
median patch norm of the same image) usable as a training metric for any
size. The median is per image: outliers are a few % of an image's patches,
and a per-image sort stays on the image's device, where a median over the
global batch would sort every patch of the step across the mesh.
"""

import jax.numpy as jnp


def token_norms(tokens):
  """L2 norm over the last axis, in float32."""
  return jnp.linalg.norm(tokens.astype(jnp.float32), axis=-1)


def high_norm_fraction(patches, *, cutoff: float | None = None, factor: float = 4.0):
  """Fraction of patch tokens ``[..., N, D]`` that are outliers.

  With ``cutoff`` the paper's absolute threshold; otherwise ``factor`` times
  the median patch norm of each image (over its ``N`` patches).
  """
  return outlier_fraction(token_norms(patches), cutoff=cutoff, factor=factor)


def outlier_fraction(norms, *, cutoff: float | None = None, factor: float = 4.0):
  """``high_norm_fraction`` from the patch-token norms ``[..., N]``."""
  if cutoff is not None:
    return jnp.mean(norms > cutoff)
  return jnp.mean(norms > factor * jnp.median(norms, axis=-1, keepdims=True))
