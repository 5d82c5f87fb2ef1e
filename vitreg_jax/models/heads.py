"""Projection heads: DINOv2's DINO/iBOT head with weight-normalised prototypes.

``DINOHead``: MLP ``D -> hidden -> ... -> bottleneck`` (exact GELU, no BN),
L2 normalise, then a weight-normalised bias-free linear layer onto ``K``
prototypes (REFERENCE §3). Parameter names mirror the reference so the
converter is a short table:

====================================  =======================================
ours                                  DINOv2 (``dino_head.`` / ``ibot_head.``)
====================================  =======================================
``mlp/layers_{j}/{kernel,bias}``      ``mlp.{j}.{weight,bias}`` (j = 0, 2, 4: the
                                      torch ``Sequential`` index, GELUs between)
``last_layer/weight_v [bneck, K]``    ``last_layer.weight_v [K, bneck]`` (transposed)
``last_layer/weight_g [1, K]``        ``last_layer.weight_g [K, 1]`` (transposed)
====================================  =======================================

Logical axes: ``embed`` (backbone width), ``mlp`` (hidden width; a square
hidden layer names only its output axis, since one param cannot use a mesh
axis twice), ``prototypes`` (K); the bottleneck axis is unnamed (replicated).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vitreg_jax.models.layers import LINEAR_INIT, gelu, logical

Dtype = Any
# torch's default nn.Linear init, which the reference keeps for weight_v:
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def l2_normalize(x, eps: float = 1e-12):
  """``x / max(||x||, eps)`` (torch ``F.normalize``), in float32, finite gradient at 0."""
  x = x.astype(jnp.float32)
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(sq, eps * eps))


class WeightNormLinear(nn.Module):
  """Bias-free ``x @ (g * v / ||v||)``, the norm per output column (torch ``weight_norm``).

  Computed as ``(x @ v) * (g / ||v||)`` so the normalised weight is never
  materialised; accumulates and returns float32 logits (the teacher
  temperature of 0.04 amplifies logit rounding).
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    v = self.param('weight_v', logical(TORCH_LINEAR_INIT, None, 'prototypes'),
                   (x.shape[-1], self.features), jnp.float32)
    g = self.param('weight_g', logical(nn.initializers.ones, None, 'prototypes'),
                   (1, self.features), jnp.float32)
    scale = g[0] / jnp.sqrt(jnp.sum(v * v, axis=0))
    logits = jnp.einsum('...i,ik->...k', x.astype(self.dtype), v.astype(self.dtype),
                        preferred_element_type=jnp.float32)
    return logits * scale


class ProjectionMLP(nn.Module):
  """``nlayers`` Dense layers with exact GELU between, named by torch index."""
  hidden_dim: int
  bottleneck_dim: int
  nlayers: int = 3
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    widths = [self.hidden_dim] * (self.nlayers - 1) + [self.bottleneck_dim]
    for i, width in enumerate(widths):
      last = i == len(widths) - 1
      in_axis = 'embed' if i == 0 else ('mlp' if last else None)
      out_axis = None if last else 'mlp'
      x = nn.Dense(width, use_bias=self.use_bias, dtype=self.dtype,
                   kernel_init=logical(LINEAR_INIT, in_axis, out_axis),
                   bias_init=logical(nn.initializers.zeros, out_axis),
                   name=f'layers_{2 * i}')(x)
      if not last:
        x = gelu(x)
    return x


class DINOHead(nn.Module):
  """DINOv2 ``DINOHead``: ``[..., D] -> [..., K]`` float32 prototype logits.

  Defaults are DINOv2's (hidden 2048, bottleneck 256, 3 layers); ViT-L/g
  configs use ``out_dim=131072, bottleneck_dim=384``. The same class serves a
  separate iBOT head.
  """
  out_dim: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  nlayers: int = 3
  mlp_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.nlayers < 1:
      raise ValueError(f'nlayers={self.nlayers}; DINOHead needs at least 1 layer')
    x = ProjectionMLP(self.hidden_dim, self.bottleneck_dim, self.nlayers, self.mlp_bias,
                      self.dtype, name='mlp')(x)
    x = l2_normalize(x)
    return WeightNormLinear(self.out_dim, self.dtype, name='last_layer')(x)


class ViTClassifier(nn.Module):
  """A backbone + ``head: Dense(embed -> classes)`` on its normed cls token (DeiT / timm).

  Returns the backbone's output dict plus ``logits [B, classes]`` (float32),
  so the feature pass and every analysis read a classifier like a backbone.
  ``pool='mean'`` averages the patch tokens instead; registers are never pooled.
  """
  backbone: nn.Module
  num_classes: int
  pool: str = 'cls'

  @nn.compact
  def __call__(self, images, train: bool = False, **kwargs):
    if self.pool not in ('cls', 'mean'):
      raise ValueError(f"pool={self.pool!r}; valid: 'cls', 'mean'")
    out = dict(self.backbone(images, train=train, **kwargs))
    if self.pool == 'cls':
      if 'cls' not in out:
        raise ValueError("pool='cls' needs a class token; use pool='mean'")
      features = out['cls']
    else:
      features = out['patches'].mean(axis=1)
    features = nn.with_logical_constraint(features, ('batch', 'embed'))
    logits = nn.Dense(self.num_classes, dtype=self.backbone.dtype,
                      kernel_init=logical(LINEAR_INIT, 'embed', 'classes'),
                      bias_init=logical(nn.initializers.zeros, 'classes'),
                      name='head')(features)
    out['logits'] = logits.astype(jnp.float32)
    return out
