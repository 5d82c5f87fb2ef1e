"""Vision Transformer with register tokens, in DINOv2's layout (REFERENCE §1).

Token order is ``[cls, reg_1..reg_R, patch_1..patch_N]``. Registers are added
after the position embedding (they have none) and are dropped from every pooled
or dense output: they exist only as scratch space for the network.

The module returns a dict so the analyses (norms, attention maps, LOST, probes)
read what they need instead of re-implementing the forward pass.

Further internals are sown into the ``'intermediates'`` collection (flax
``sow``: a tuple with one entry per call of the module) and come back only
when the collection is mutable; otherwise ``sow`` is a no-op and costs nothing::

    out, state = model.apply(variables, images, mutable=['intermediates'])
    inter = state['intermediates']
    inter['patch_embed_out']      # ([B, N, D],) patch projection output, before
                                  # mask tokens and the position embedding
    inter['blocks_3']['attn']['q']  # ([B, T, H, hd],) also 'k', 'v'; unrolled blocks
    inter['blocks_3']['mlp']['hidden']  # ([B, T, hidden],) MLP activations after the nonlinearity
    inter['blocks']['attn']['q']    # ([L, B, T, H, hd],) with scan_blocks=True
    block_intermediates(inter, 'q')  # [L, B, T, H, hd] for either layout

``q, k, v`` are the qkv projection's outputs (with bias, before the
``hd ** -0.5`` scaling): ``softmax(q k^T / sqrt(hd))`` is the ``attention``
output of ``return_attention=True``.
"""

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitreg_jax.models import layers
from vitreg_jax.models.pos_embed import resample_patch_pos_embed

Dtype = Any

REMAT_POLICIES = {
    'none': None,  # no rematerialisation
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# PyTorch's default Conv2d init, which DINOv2 keeps for the patch embedding (only
# Linear layers are re-initialised): kaiming_uniform(a=sqrt(5)) on the weight is
# U(+-1/sqrt(fan_in)), and the bias is U(+-1/sqrt(fan_in)) too; fan_in = 3 p^2.
TORCH_CONV_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_conv_bias_init(fan_in: int):
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class PatchProjection(nn.Module):
  """Non-overlapping patch projection (a conv with kernel = stride = patch).

  Kept in the conv's HWIO layout ``[p, p, 3, D]`` but computed as a patchify
  reshape + one matmul, which is the same arithmetic and faster than a strided
  conv on CPU and TPU. Initialised as torch's ``Conv2d`` (REFERENCE §1).
  """
  patch_size: int
  embed_dim: int
  dtype: Dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, images):
    b, h, w, c = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(
          f'image size {h}x{w} is not a multiple of the patch size {p}; '
          f'resize or pad to e.g. {h // p * p}x{w // p * p}')
    kernel = self.param(
        'kernel', layers.logical(TORCH_CONV_KERNEL_INIT, None, None, None, 'embed'),
        (p, p, c, self.embed_dim), jnp.float32)
    patches = images.reshape(b, h // p, p, w // p, p, c).astype(self.dtype)
    out = jnp.einsum('bhpwqc,pqcd->bhwd', patches, kernel.astype(self.dtype))
    if not self.use_bias:
      return out
    bias = self.param('bias', layers.logical(torch_conv_bias_init(p * p * c), 'embed'),
                      (self.embed_dim,), jnp.float32)
    return out + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
  """``patch_embed/proj`` as in DINOv2; output ``[B, h, w, D]``."""
  patch_size: int
  embed_dim: int
  dtype: Dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, images):
    return PatchProjection(self.patch_size, self.embed_dim, self.dtype, self.use_bias,
                           name='proj')(images)


class ScannedBlock(layers.Block):
  """``Block`` in the (carry, per-layer output) form ``nn.scan`` wants."""
  return_layers: bool = False
  return_probs: bool = False

  def __call__(self, x, deterministic):
    x, probs = super().__call__(x, deterministic, self.return_probs)
    return x, (x if self.return_layers else None, probs)


def run_blocks(block_kwargs: dict, depth: int, x, deterministic: bool, return_layers: bool,
               return_attention: bool, scan_blocks: bool = False, remat_policy: str = 'none',
               neuron_edits: dict | None = None):
  """``depth`` blocks ``Block(**block_kwargs)`` on ``x``: ``blocks_{i}``, or one scanned ``blocks``.

  Call from a compact method: the blocks become submodules of the calling
  module. Returns ``x`` and the stacked per-layer tokens / attention
  probabilities (``None`` unless asked).
  """
  policy = REMAT_POLICIES[remat_policy]
  if scan_blocks:
    body = ScannedBlock
    if remat_policy != 'none':
      body = nn.remat(body, policy=policy, static_argnums=(2,), prevent_cse=False)
    scanned = nn.scan(
        body, variable_axes={'params': 0, 'intermediates': 0}, split_rngs={'params': True, 'dropout': True},
        in_axes=nn.broadcast, length=depth,
        metadata_params={nn.PARTITION_NAME: 'layers'})
    x, (per_layer, probs) = scanned(
        **block_kwargs, return_layers=return_layers,
        return_probs=return_attention, name='blocks')(x, deterministic)
    return x, per_layer, probs
  block_cls = layers.Block
  if remat_policy != 'none':
    block_cls = nn.remat(block_cls, policy=policy, static_argnums=(2, 3))
  per_layer, probs = [], []
  for i in range(depth):
    edit = (neuron_edits or {}).get(i)
    extra = {'neuron_edit': edit} if edit is not None else {}
    x, p = block_cls(**block_kwargs, **extra, name=f'blocks_{i}')(x, deterministic,
                                                                  return_attention)
    per_layer.append(x)
    probs.append(p)
  stack = lambda xs, on: jnp.stack(xs) if on else None
  return x, stack(per_layer, return_layers), stack(probs, return_attention)


class VisionTransformer(nn.Module):
  """DINOv2-style ViT; see the module docstring for the token layout.

  ``norm_pre``, ``patch_bias=False`` and ``act='quick_gelu'`` give OpenCLIP's
  (and timm's ``*_clip_*``) variant: a LayerNorm ``norm_pre`` on all tokens
  before the blocks, a bias-free patch projection, QuickGELU for OpenAI
  weights. The defaults are DINOv2's.
  """
  patch_size: int = 14
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  ffn: str = 'mlp'  # 'mlp' | 'swiglu'
  num_registers: int = 4
  class_token: bool = True
  layerscale_init: float | None = 1e-5
  drop_path_rate: float = 0.0
  drop_path_mode: str = 'sample'  # 'sample' (timm's) | 'subset' (DINOv2's); see layers.Block
  drop_path_groups: int = 1  # subset mode: row groups (the reference's per-GPU batches)
  img_size: int = 518  # the grid pos_embed was learned on: img_size // patch_size
  interpolate_antialias: bool = True
  interpolate_offset: float = 0.0
  norm_eps: float = 1e-6
  norm_pre: bool = False
  patch_bias: bool = True
  act: str = 'gelu'  # 'gelu' | 'quick_gelu' (MLP activation)
  dtype: Dtype = jnp.float32
  scan_blocks: bool = False
  remat_policy: str = 'none'
  attention_impl: str = 'auto'
  # Test-time registers (Jiang et al. 2025; analysis/register_neurons.py): extra tokens,
  # zero input and no position, after the trained registers and dropped from every
  # output like them; ``register_neurons`` ((layer, (neuron, ...)), ...) are the MLP
  # neurons whose activations move into them. All off by default and free when off.
  num_test_time_registers: int = 0
  register_neurons: tuple = ()
  neuron_scale: float = 1.0
  neuron_mode: str = 'zero'  # what the patches' activations become: layers.NEURON_EDIT_MODES

  @property
  def mlp_hidden_dim(self) -> int:
    if self.ffn == 'swiglu':
      return layers.swiglu_hidden_dim(self.embed_dim, self.mlp_ratio)
    return int(self.embed_dim * self.mlp_ratio)

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patches: cls, trained registers, test-time registers."""
    return int(self.class_token) + self.num_registers + self.num_test_time_registers

  def token_slices(self) -> dict[str, slice]:
    """Where each kind of token sits in the sequence ``[cls, registers, test-time, patches]``."""
    c, r, t = int(self.class_token), self.num_registers, self.num_test_time_registers
    return {'cls': slice(0, c), 'registers': slice(c, c + r),
            'test_time_registers': slice(c + r, c + r + t), 'patches': slice(c + r + t, None)}

  def _neuron_edits(self) -> dict[int, layers.NeuronEdit]:
    edits = {}
    for layer, neurons in self.register_neurons:
      if not 0 <= layer < self.depth:
        raise ValueError(f'register_neurons: layer {layer} of a {self.depth}-block model')
      bad = [n for n in neurons if not 0 <= n < self.mlp_hidden_dim]
      if bad:
        raise ValueError(f'register_neurons: layer {layer} neurons {bad} outside the MLP width '
                         f'{self.mlp_hidden_dim}')
      if neurons:
        edits[int(layer)] = layers.NeuronEdit(
            tuple(int(n) for n in neurons), int(self.class_token) + self.num_registers,
            self.num_test_time_registers, self.neuron_scale, self.neuron_mode)
    if edits and not self.num_test_time_registers:
      raise ValueError('register_neurons move activations into test-time registers: set '
                       'num_test_time_registers >= 1')
    if edits and self.scan_blocks:
      raise ValueError('register_neurons edit chosen layers: use scan_blocks=False')
    if self.neuron_mode not in layers.NEURON_EDIT_MODES:
      raise ValueError(f'neuron_mode={self.neuron_mode!r}; valid: {layers.NEURON_EDIT_MODES}')
    return edits

  def _validate(self):
    if self.ffn not in ('mlp', 'swiglu'):
      raise ValueError(f"ffn={self.ffn!r}; valid: 'mlp', 'swiglu'")
    if not 0 <= self.num_registers <= 64:
      raise ValueError(f'num_registers={self.num_registers}; expected 0..64')
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'remat_policy={self.remat_policy!r}; valid: {sorted(REMAT_POLICIES)}')
    layers.check_drop_path_mode(self.drop_path_mode)
    layers.check_activation(self.act, self.ffn)

  def _tokens(self, images, masks):
    """Patch embed, iBOT mask tokens, cls + pos_embed, then registers."""
    d = self.embed_dim
    x = PatchEmbed(self.patch_size, d, self.dtype, self.patch_bias, name='patch_embed')(images)
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, d)
    self.sow('intermediates', 'patch_embed_out', x)
    mask_token = self.param('mask_token', layers.logical(nn.initializers.zeros, None, 'embed'),
                            (1, d), jnp.float32)
    if masks is not None:
      if masks.shape != (b, gh * gw):
        raise ValueError(f'masks shape {masks.shape} != (batch, patches) = {(b, gh * gw)}')
      x = jnp.where(masks[..., None], mask_token.astype(x.dtype)[None], x)
    grid_ref = self.img_size // self.patch_size
    pos_embed = self.param(
        'pos_embed', layers.logical(nn.initializers.truncated_normal(0.02), None, 'tokens', 'embed'),
        (1, int(self.class_token) + grid_ref * grid_ref, d), jnp.float32)
    patch_pos = resample_patch_pos_embed(
        pos_embed[0, int(self.class_token):], (gh, gw),
        antialias=self.interpolate_antialias, offset=self.interpolate_offset)
    x = x + patch_pos.astype(x.dtype)[None]
    prefix = []
    if self.class_token:
      cls = self.param('cls_token', layers.logical(nn.initializers.normal(1e-6), None, None, 'embed'),
                       (1, 1, d), jnp.float32)
      prefix.append(jnp.broadcast_to(cls + pos_embed[:, :1], (b, 1, d)))
    if self.num_registers:
      reg = self.param('register_tokens',
                       layers.logical(nn.initializers.normal(1e-6), None, None, 'embed'),
                       (1, self.num_registers, d), jnp.float32)
      prefix.append(jnp.broadcast_to(reg, (b, self.num_registers, d)))
    if self.num_test_time_registers:
      prefix.append(jnp.zeros((b, self.num_test_time_registers, d), x.dtype))
    tokens = jnp.concatenate([p.astype(x.dtype) for p in prefix] + [x], axis=1)
    return tokens, (gh, gw)

  def _block_kwargs(self):
    return dict(num_heads=self.num_heads, mlp_hidden_dim=self.mlp_hidden_dim, ffn=self.ffn,
                layerscale_init=self.layerscale_init, drop_path_rate=self.drop_path_rate,
                drop_path_mode=self.drop_path_mode, drop_path_groups=self.drop_path_groups,
                norm_eps=self.norm_eps, dtype=self.dtype, attention_impl=self.attention_impl,
                act=self.act)

  def _blocks(self, x, deterministic, return_layers, return_attention):
    """Runs the blocks; returns ``x`` and stacked per-layer tokens / probs."""
    return run_blocks(self._block_kwargs(), self.depth, x, deterministic, return_layers,
                      return_attention, self.scan_blocks, self.remat_policy,
                      self._neuron_edits())

  @nn.compact
  def __call__(self, images, masks=None, train: bool = False,
               return_layers: bool = False, return_attention: bool = False):
    """Forward pass on NHWC normalised images.

    Returns a dict: ``cls [B,D]`` (when ``class_token``), ``registers [B,R,D]``,
    ``patches [B,N,D]`` (all after the final norm), ``prenorm [B,T,D]``,
    ``masks``; with ``return_layers`` also ``layers`` and ``layers_normed``
    ``[L,B,T,D]`` (block outputs before / after the final norm); with
    ``return_attention`` ``attention [L,B,H,T,T]`` (float32 probabilities).
    """
    self._validate()
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be NHWC with 3 channels, got shape {images.shape}')
    x, _ = self._tokens(images, masks)
    if self.norm_pre:
      x = layers.layer_norm(self.norm_eps, self.dtype, 'norm_pre')(x)
    x = nn.with_logical_constraint(x, ('batch', 'tokens', 'embed'))
    x, per_layer, probs = self._blocks(x, not train, return_layers, return_attention)
    norm = layers.layer_norm(self.norm_eps, self.dtype, 'norm')
    normed = norm(x)
    where = self.token_slices()
    out = {
        'registers': normed[:, where['registers']],
        'patches': normed[:, where['patches']],
        'prenorm': x,
        'masks': masks,
    }
    if self.num_test_time_registers:
      out['test_time_registers'] = normed[:, where['test_time_registers']]
    if self.class_token:
      out['cls'] = normed[:, 0]
    if return_layers:
      out['layers'] = per_layer
      out['layers_normed'] = norm(per_layer)
    if return_attention:
      out['attention'] = probs
    return out

  def intermediate_layers(self, images, n: int = 1, norm: bool = True):
    """Patch tokens of the last ``n`` blocks, cls and registers dropped.

    DINOv2's ``get_intermediate_layers(x, n, norm=norm)``: a list of
    ``[B, N, D]``; with ``norm`` the final norm is applied to each. Returns
    ``(patches, cls)`` lists, the second empty without a class token.
    """
    if not 1 <= n <= self.depth:
      raise ValueError(f'n={n}; this model has {self.depth} blocks')
    out = self(images, return_layers=True)
    tokens = out['layers_normed' if norm else 'layers'][self.depth - n:]
    start = self.num_prefix_tokens
    patches = [t[:, start:] for t in tokens]
    cls = [t[:, 0] for t in tokens] if self.class_token else []
    return patches, cls


# name -> (embed_dim, depth, num_heads, ffn)
VARIANTS = {
    'ti': (192, 12, 3, 'mlp'),
    's': (384, 12, 6, 'mlp'),
    'b': (768, 12, 12, 'mlp'),
    'l': (1024, 24, 16, 'mlp'),
    'g': (1536, 40, 24, 'swiglu'),
}
_ARCH_RE = re.compile(r'^vit(ti|s|b|l|g)(\d+)(?:_reg(\d*))?$')


def block_intermediates(intermediates, name: str, call: int = -1, module: str = 'attn'):
  """A per-block sown value stacked as ``[L, ...]``: ``'q'``, ``'k'``, ``'v'`` of ``attn``,
  ``'hidden'`` of ``mlp`` (the activations after the nonlinearity).

  ``intermediates`` is the ``'intermediates'`` collection of an ``apply`` with
  ``mutable=['intermediates']``, from unrolled (``blocks_{i}``) or scanned
  (``blocks``) blocks. ``call`` picks one forward pass when the model was
  called several times in that ``apply`` (each sow appends an entry).
  """
  if 'blocks' in intermediates:
    return intermediates['blocks'][module][name][call]
  keys = sorted((k for k in intermediates if re.fullmatch(r'blocks_\d+', k)),
                key=lambda k: int(k.split('_')[1]))
  if not keys:
    raise KeyError(f'no block intermediates; sown keys: {sorted(intermediates)}')
  return jnp.stack([intermediates[k][module][name][call] for k in keys])


def arch_kwargs(name: str) -> dict:
  """Constructor kwargs for names like ``vits14``, ``vitl14_reg``, ``vitb16_reg8``.

  ``_reg`` alone means 4 registers (the released models). Register models use
  the antialiased position-embedding resampling; the rest DINOv2's legacy path.
  """
  m = _ARCH_RE.match(name.lower())
  if not m:
    raise ValueError(
        f'unknown arch {name!r}; expected vit{{{"|".join(VARIANTS)}}}{{patch}}[_reg[N]], '
        "e.g. 'vits14_reg', 'vitl14', 'vitb16_reg8'")
  variant, patch, reg = m.groups()
  dim, depth, heads, ffn = VARIANTS[variant]
  patch = int(patch)
  registers = 0 if reg is None else int(reg or 4)
  return dict(
      patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, ffn=ffn,
      num_registers=registers, img_size=518 if patch == 14 else 224,
      interpolate_antialias=registers > 0, interpolate_offset=0.0 if registers else 0.1)


def get_arch(name: str, **overrides) -> VisionTransformer:
  kwargs = arch_kwargs(name)
  unknown = set(overrides) - {f.name for f in dataclasses.fields(VisionTransformer)}
  if unknown:
    raise ValueError(f'unknown VisionTransformer fields {sorted(unknown)}')
  kwargs.update(overrides)
  return VisionTransformer(**kwargs)
