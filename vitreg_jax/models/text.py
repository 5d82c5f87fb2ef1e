"""CLIP's text tower: a causal pre-LN transformer pooled at the end-of-text token.

As OpenCLIP's ``TextTransformer`` (REFERENCE §4, §9): token embedding +
learned positional embedding, pre-LN blocks with a causal mask (token ``i``
sees tokens ``0..i``), ``ln_final`` on every token, the feature of the EOT
token (the largest id of each row: ``argmax(tokens)``), then a bias-free
``text_projection [width, embed_dim]``. The blocks are ``layers.Block``
(same names and layouts as the image tower's), so one converter table serves
both towers. LayerNorm eps 1e-5 and no LayerScale are OpenCLIP's defaults.

Parameters::

    token_embedding/embedding [vocab, width]   positional_embedding [context, width]
    blocks_{i}/...  (or blocks/... scanned)    ln_final/{scale,bias}
    text_projection [width, embed_dim]
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vitreg_jax.models import layers
from vitreg_jax.models.vit import REMAT_POLICIES, run_blocks

Dtype = Any
VOCAB_SIZE = 49408  # CLIP BPE (data/tokenizer.py)
CONTEXT_LENGTH = 77


class TextTransformer(nn.Module):
  """``tokens [B, T] int -> {'embeds' [B, E], 'pooled' [B, W], 'tokens' [B, T, W]}``.

  ``embeds`` is the projection of ``pooled`` (not L2-normalised; ``CLIP`` does
  that); ``tokens`` are all positions after ``ln_final``. ``T`` may be shorter
  than ``context_length`` (the positional table is sliced).
  """
  vocab_size: int = VOCAB_SIZE
  context_length: int = CONTEXT_LENGTH
  width: int = 512
  depth: int = 12
  num_heads: int = 8
  mlp_ratio: float = 4.0
  embed_dim: int = 512
  act: str = 'gelu'  # 'quick_gelu' for OpenAI weights
  norm_eps: float = 1e-5
  layerscale_init: float | None = None
  causal: bool = True
  dtype: Dtype = jnp.float32
  scan_blocks: bool = False
  remat_policy: str = 'none'
  attention_impl: str = 'auto'

  @property
  def mlp_hidden_dim(self) -> int:
    return int(self.width * self.mlp_ratio)

  def _validate(self, tokens):
    layers.check_activation(self.act)
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'remat_policy={self.remat_policy!r}; valid: {sorted(REMAT_POLICIES)}')
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'tokens must be integer ids [batch, length], got {tokens.dtype} '
                       f'{tokens.shape}')
    if tokens.shape[1] > self.context_length:
      raise ValueError(f'{tokens.shape[1]} tokens > context_length {self.context_length}')

  def _block_kwargs(self) -> dict:
    return dict(num_heads=self.num_heads, mlp_hidden_dim=self.mlp_hidden_dim,
                layerscale_init=self.layerscale_init, norm_eps=self.norm_eps, dtype=self.dtype,
                attention_impl=self.attention_impl, act=self.act, causal=self.causal)

  @nn.compact
  def __call__(self, tokens, train: bool = False, return_layers: bool = False):
    """``return_layers`` adds ``layers [L, B, T, W]`` (block outputs, before ``ln_final``)."""
    self._validate(tokens)
    w = self.width
    x = nn.Embed(self.vocab_size, w, dtype=self.dtype,
                 embedding_init=layers.logical(nn.initializers.normal(0.02), 'vocab', 'embed'),
                 name='token_embedding')(tokens)
    pos = self.param('positional_embedding',
                     layers.logical(nn.initializers.normal(0.01), 'tokens', 'embed'),
                     (self.context_length, w), jnp.float32)
    x = x + pos[:tokens.shape[1]].astype(x.dtype)[None]
    x = nn.with_logical_constraint(x, ('batch', 'tokens', 'embed'))
    x, per_layer, _ = run_blocks(self._block_kwargs(), self.depth, x, not train, return_layers,
                                 False, self.scan_blocks, self.remat_policy)
    x = layers.layer_norm(self.norm_eps, self.dtype, 'ln_final')(x)
    eot = jnp.argmax(tokens, axis=-1)  # the end-of-text id is the largest in the vocabulary
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    projection = self.param('text_projection',
                            layers.logical(nn.initializers.normal(w ** -0.5), 'embed', None),
                            (w, self.embed_dim), jnp.float32)
    embeds = pooled @ projection.astype(pooled.dtype)
    out = {'embeds': embeds, 'pooled': pooled, 'tokens': x}
    if return_layers:
      out['layers'] = per_layer
    return out
