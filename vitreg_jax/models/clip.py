"""CLIP: our ViT (with registers) as image tower, a causal text tower, one embedding space.

As OpenCLIP (REFERENCE §4): the image tower's final-normed tokens are pooled
(``'cls'``, or ``'mean'`` over the patch tokens; registers are never pooled),
projected by a bias-free ``image_projection [D, E]``; the text tower pools at
the EOT token and projects by its ``text_projection``; both embeddings are
L2-normalised. ``logit_scale`` is the *log* of the temperature's inverse
(init ln(1/0.07); SigLIP: ln 10 with ``init_logit_bias=-10``, the bias exists
only when it has an init). The loss (``losses.contrastive``) takes them as
they are; clamping ``logit_scale`` to [0, ln 100] is the training loop's job.

The image tower's outputs (``cls``, ``registers``, ``patches``, ...) come
back with the embeddings, so every analysis reads a CLIP model like a
backbone. Zero-shot needs the text side alone::

    txt = model.apply(variables, tokens, method=CLIP.encode_text)   # [n, E], unit norm
    img = model.apply(variables, images, method=CLIP.encode_image)  # dict, 'embeds' [B, E]

Parameters: ``visual/...`` (a ``VisionTransformer``), ``image_projection``,
``text/...`` (a ``TextTransformer``), ``logit_scale`` ``[]``, ``logit_bias`` ``[]``.
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from vitreg_jax.models import layers
from vitreg_jax.models.heads import l2_normalize
from vitreg_jax.models.text import TextTransformer

POOLS = ('cls', 'mean')
INIT_LOGIT_SCALE = math.log(1 / 0.07)
SIGLIP_INIT = {'init_logit_scale': math.log(10.0), 'init_logit_bias': -10.0}


def pool_image_tokens(out: dict, pool: str):
  """The image tower's pooled feature ``[B, D]``: the cls token or the mean of the patches."""
  if pool not in POOLS:
    raise ValueError(f'pool={pool!r}; valid: {POOLS}')
  if pool == 'cls':
    if 'cls' not in out:
      raise ValueError("pool='cls' needs a class token; use pool='mean'")
    return out['cls']
  return out['patches'].mean(axis=1)  # registers live in out['registers'], never here


def logits(image_embeds, text_embeds, logit_scale, logit_bias=None):
  """``exp(logit_scale) * img @ txt.T (+ bias)``, float32 ``[B_img, B_txt]``."""
  z = jnp.exp(logit_scale) * (image_embeds @ text_embeds.T)
  return z if logit_bias is None else z + logit_bias


class CLIP(nn.Module):
  """Two towers; ``__call__(images, tokens)`` -> dict (see the module docstring)."""
  visual: nn.Module  # a VisionTransformer
  text: TextTransformer
  embed_dim: int = 512
  pool: str = 'cls'
  init_logit_scale: float = INIT_LOGIT_SCALE
  init_logit_bias: float | None = None

  def setup(self):
    if self.pool not in POOLS:
      raise ValueError(f'pool={self.pool!r}; valid: {POOLS}')
    if self.text.embed_dim != self.embed_dim:
      raise ValueError(f'text tower projects to {self.text.embed_dim}, CLIP embed_dim is '
                       f'{self.embed_dim}')
    self.image_projection = self.param(
        'image_projection',
        layers.logical(nn.initializers.normal(self.visual.embed_dim ** -0.5), 'embed', None),
        (self.visual.embed_dim, self.embed_dim), jnp.float32)
    self.logit_scale = self.param('logit_scale', nn.initializers.constant(self.init_logit_scale),
                                  (), jnp.float32)
    self.logit_bias = None
    if self.init_logit_bias is not None:
      self.logit_bias = self.param('logit_bias', nn.initializers.constant(self.init_logit_bias),
                                   (), jnp.float32)

  def encode_image(self, images, masks=None, train: bool = False, **kwargs):
    """The image tower's output dict plus ``pooled [B, D]`` and unit-norm ``embeds [B, E]``.

    ``kwargs`` go to the tower (``return_layers``, ``return_attention``).
    """
    out = dict(self.visual(images, masks=masks, train=train, **kwargs))
    pooled = nn.with_logical_constraint(pool_image_tokens(out, self.pool), ('batch', 'embed'))
    out['pooled'] = pooled
    out['embeds'] = l2_normalize(pooled @ self.image_projection.astype(pooled.dtype))
    return out

  def encode_text(self, tokens, train: bool = False):
    """Unit-norm text embeddings ``[B, E]`` (float32) of token ids ``[B, T]``."""
    return l2_normalize(self.text(tokens, train=train)['embeds'])

  def __call__(self, images, tokens, train: bool = False, **kwargs):
    """``image_embeds``, ``text_embeds`` (unit norm, float32), ``logit_scale`` (the log
    parameter), ``logit_bias`` (or None), ``image_pooled`` and the image tower's outputs."""
    image = self.encode_image(images, train=train, **kwargs)
    out = {k: v for k, v in image.items() if k not in ('pooled', 'embeds')}
    out.update(image_embeds=image['embeds'], image_pooled=image['pooled'],
               text_embeds=self.encode_text(tokens, train=train),
               logit_scale=self.logit_scale, logit_bias=self.logit_bias)
    return out
