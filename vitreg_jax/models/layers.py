"""Transformer block pieces with DINOv2 names and logical axis annotations.

Parameter names follow DINOv2 (``attn/qkv``, ``attn/proj``, ``ls1``, ``mlp/fc1``,
``mlp/w12`` ...) so that each weight converter is a short table. Kernels keep
the head and q/k/v axes explicit (``qkv`` kernel ``[D, 3, H, hd]``) so tensor
parallelism can shard heads without splitting q, k and v across devices.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitreg_jax.models import attention as attention_lib

Dtype = Any
LINEAR_INIT = nn.initializers.truncated_normal(stddev=0.02)


def quick_gelu(x):
  """OpenAI CLIP's GELU approximation ``x * sigmoid(1.702 x)``."""
  return x * jax.nn.sigmoid(jnp.asarray(1.702, x.dtype) * x)


def gelu(x):
  """Exact GELU as PyTorch computes it, ``x / 2 * (1 + erf(x / sqrt 2))``.

  ``jax.nn.gelu(approximate=False)`` goes through ``erfc`` with a branch per
  element, 1.25x slower on CPU (``experiments/benchmarks/block_profile.py``).
  Within 1.2e-6 of both and of torch's ``F.gelu`` on [-12, 12]; like torch's,
  absolute rather than relative accuracy in the far negative tail.
  """
  half = jnp.asarray(0.5, x.dtype)
  return half * x * (1 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


# MLP activations by name: exact GELU (DINOv2, timm, OpenCLIP's default) or
# QuickGELU (OpenAI CLIP weights, OpenCLIP ``*-quickgelu`` configs).
ACTIVATIONS = {'gelu': gelu, 'quick_gelu': quick_gelu}


def check_activation(act: str, ffn: str = 'mlp') -> None:
  if ffn not in ('mlp', 'swiglu'):
    raise ValueError(f"ffn={ffn!r}; valid: 'mlp', 'swiglu'")
  if act not in ACTIVATIONS:
    raise ValueError(f'act={act!r}; valid: {sorted(ACTIVATIONS)}')
  if ffn == 'swiglu' and act != 'gelu':
    raise ValueError(f"act={act!r} applies to ffn='mlp' only (SwiGLU gates with SiLU)")


def logical(init: Callable, *names: str | None) -> Callable:
  return nn.with_logical_partitioning(init, names)


def layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  """LayerNorm over ``embed`` (eps 1e-6 in DINOv2); flax keeps statistics in float32."""
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype,
      scale_init=logical(nn.initializers.ones, 'embed'),
      bias_init=logical(nn.initializers.zeros, 'embed'),
      name=name)


class DenseND(nn.Module):
  """``DenseGeneral`` whose kernel is created in its full N-d shape.

  flax's ``DenseGeneral`` initialises a flat 2-d kernel and reshapes it; its
  logical axis names then get applied to the flat kernel, which fails under a
  mesh with axis rules (flax issue #3676). Here the initialiser sees the real
  shape, so ``[D, 3, H, hd]`` kernels shard by name. Contracts the last
  ``contract_dims`` input axes with the leading kernel axes.
  """
  features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  bias_axes: tuple[str | None, ...]
  contract_dims: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n = self.contract_dims
    kernel = self.param('kernel', logical(LINEAR_INIT, *self.kernel_axes),
                        tuple(x.shape[-n:]) + tuple(self.features), jnp.float32)
    bias = self.param('bias', logical(nn.initializers.zeros, *self.bias_axes),
                      tuple(self.features), jnp.float32)
    contracting = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
    out = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                              (contracting, ((), ())))
    return out + bias.astype(self.dtype)


class Attention(nn.Module):
  """Multi-head self-attention; optionally returns the probabilities.

  Sows ``q``, ``k``, ``v`` (``[B, T, H, hd]``, before the ``hd ** -0.5``
  scaling) into ``'intermediates'``. ``causal``: token ``i`` attends to
  tokens ``0..i`` only (CLIP's text tower).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  impl: str = 'auto'
  causal: bool = False

  @nn.compact
  def __call__(self, x, return_probs: bool = False):
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f'embed_dim {dim} is not divisible by num_heads {self.num_heads}')
    head_dim = dim // self.num_heads
    qkv = DenseND((3, self.num_heads, head_dim), ('embed', None, 'heads', 'head_dim'),
                  (None, 'heads', 'head_dim'), dtype=self.dtype, name='qkv')(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # Internals for analyses, each [B, T, H, hd] (no-ops unless 'intermediates'
    # is mutable; see VisionTransformer).
    self.sow('intermediates', 'q', q)
    self.sow('intermediates', 'k', k)
    self.sow('intermediates', 'v', v)
    out, probs = attention_lib.dot_product_attention(
        q, k, v, impl=self.impl, return_probs=return_probs, causal=self.causal)
    out = DenseND((dim,), ('heads', 'head_dim', 'embed'), ('embed',), contract_dims=2,
                  dtype=self.dtype, name='proj')(out)
    return out, probs


NEURON_EDIT_MODES = ('zero', 'mean', 'only_outliers', 'same')


@dataclasses.dataclass(frozen=True)
class NeuronEdit:
  """Test-time registers' edit of one layer's MLP hidden activations (Jiang et al. 2025).

  Token layout ``[keep (cls + trained registers), test-time tokens, patches]``:
  per image, ``s`` = the signed maximum (largest ``|value|``, sign kept) over
  *all* tokens x the selected ``neurons`` jointly; the test-time tokens' selected
  activations become ``scale * s``; the patches' become 0 (``'zero'``), their
  mean over the patches (``'mean'``), that mean only where above mean + std
  (``'only_outliers'``), or stay (``'same'``); cls and trained registers are untouched.
  """
  neurons: tuple[int, ...]
  keep: int          # leading tokens never edited (cls + trained registers)
  num_tokens: int    # test-time tokens right after them
  scale: float = 1.0
  mode: str = 'zero'

  def __call__(self, hidden):
    """``hidden [B, T, hidden_dim]`` -> edited."""
    idx = jnp.asarray(self.neurons)
    selected = hidden[..., idx]                                   # [B, T, k]
    flat = selected.reshape(selected.shape[0], -1)
    s = jnp.take_along_axis(flat, jnp.abs(flat).argmax(-1)[:, None], axis=-1)  # [B, 1]
    start, patches = self.keep, self.keep + self.num_tokens
    tt = jnp.broadcast_to((self.scale * s)[:, None, :].astype(hidden.dtype),
                          (hidden.shape[0], self.num_tokens, len(self.neurons)))
    rest = selected[:, patches:]
    mean = rest.mean(axis=1, keepdims=True)
    if self.mode == 'zero':
      rest = jnp.zeros_like(rest)
    elif self.mode == 'mean':
      rest = jnp.broadcast_to(mean, rest.shape)
    elif self.mode == 'only_outliers':  # above mean + std (unbiased, as torch.std) -> mean
      outlier = rest > mean + jnp.std(rest, axis=1, keepdims=True, ddof=1)
      rest = jnp.where(outlier, mean, rest)
    edited = jnp.concatenate([selected[:, :start], tt, rest], axis=1)
    return jnp.asarray(hidden).at[..., idx].set(edited)


def _edit_hidden(module: nn.Module, hidden, edit: NeuronEdit | None):
  """Sows the hidden activations (register-neuron search), then applies ``edit``."""
  module.sow('intermediates', 'hidden', hidden)
  return hidden if edit is None else edit(hidden)


class Mlp(nn.Module):
  """``fc2(act(fc1(x)))``; ``act`` names an entry of ``ACTIVATIONS``; ``edit`` a test-time
  register edit of the activations (``None``: none)."""
  hidden_dim: int
  dtype: Dtype = jnp.float32
  act: str = 'gelu'
  edit: NeuronEdit | None = None

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype,
                 kernel_init=logical(LINEAR_INIT, 'embed', 'mlp'),
                 bias_init=logical(nn.initializers.zeros, 'mlp'), name='fc1')(x)
    x = _edit_hidden(self, ACTIVATIONS[self.act](x), self.edit)
    return nn.Dense(dim, dtype=self.dtype,
                    kernel_init=logical(LINEAR_INIT, 'mlp', 'embed'),
                    bias_init=logical(nn.initializers.zeros, 'embed'), name='fc2')(x)


class SwiGLU(nn.Module):
  """DINOv2's fused SwiGLU: ``w3(silu(x1) * x2)`` with ``x1, x2 = w12(x)``."""
  hidden_dim: int
  dtype: Dtype = jnp.float32
  edit: NeuronEdit | None = None

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    x12 = DenseND((2, self.hidden_dim), ('embed', None, 'mlp'), (None, 'mlp'),
                  dtype=self.dtype, name='w12')(x)
    hidden = _edit_hidden(self, nn.silu(x12[..., 0, :]) * x12[..., 1, :], self.edit)
    return nn.Dense(dim, dtype=self.dtype,
                    kernel_init=logical(LINEAR_INIT, 'mlp', 'embed'),
                    bias_init=logical(nn.initializers.zeros, 'embed'), name='w3')(hidden)


def swiglu_hidden_dim(embed_dim: int, mlp_ratio: float) -> int:
  """DINOv2's SwiGLU width: 2/3 of the MLP width, rounded up to a multiple of 8."""
  return (int(embed_dim * mlp_ratio * 2 / 3) + 7) // 8 * 8


class LayerScale(nn.Module):
  init_value: float

  @nn.compact
  def __call__(self, x):
    gamma = self.param('gamma', logical(nn.initializers.constant(self.init_value), 'embed'),
                       (x.shape[-1],), jnp.float32)
    return x * gamma.astype(x.dtype)


DROP_PATH_MODES = ('sample', 'subset')


def check_drop_path_mode(mode: str) -> None:
  if mode not in DROP_PATH_MODES:
    raise ValueError(f'drop_path_mode={mode!r}; valid: {DROP_PATH_MODES}')


class DropPath(nn.Module):
  """Stochastic depth, per sample: drops the whole residual branch with probability ``rate``.

  timm's formulation (Bernoulli per sample, survivors scaled by ``1 / (1 - rate)``):
  the right scale in expectation only, and the branch runs on every sample.
  """
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def subset_size(rows: int, rate: float) -> int:
  """Rows that keep their branch in DINOv2's subset drop path: ``max(int(b (1 - p)), 1)``."""
  return max(int(rows * (1.0 - rate)), 1)


def add_residual_on_subset(x, branch: Callable, rate: float, groups: int, rng):
  """``x + branch(x)`` with the branch run on an exact random subset of rows, per group.

  DINOv2's ``drop_add_residual_stochastic_depth``: in each group of ``g`` rows
  (the reference's per-GPU batch of one crop size) a random subset of
  ``max(int(g (1 - rate)), 1)`` rows gets the branch, scaled by ``g / subset``;
  the others skip it. The branch costs only the subset's FLOPs. Groups are
  consecutive rows, so with groups aligned to the batch shards nothing moves
  between devices.
  """
  rows = x.shape[0]
  if groups < 1 or rows % groups:
    raise ValueError(f'subset drop path: {rows} rows do not split into {groups} groups')
  g = rows // groups
  keep = subset_size(g, rate)
  keys = jax.random.split(rng, groups)
  chosen = jax.vmap(lambda k: jax.random.permutation(k, g)[:keep])(keys)  # [groups, keep]
  grouped = x.reshape((groups, g) + x.shape[1:])
  gather = chosen.reshape((groups, keep) + (1,) * (x.ndim - 1))
  subset = jnp.take_along_axis(grouped, gather, axis=1)
  residual = branch(subset.reshape((groups * keep,) + x.shape[1:]))
  residual = residual.reshape((groups, keep) + x.shape[1:]) * jnp.asarray(g / keep, x.dtype)
  out = grouped.at[jnp.arange(groups)[:, None], chosen].add(residual.astype(x.dtype))
  return out.reshape(x.shape)


class Block(nn.Module):
  """Pre-norm block: ``x + ls1(attn(norm1(x)))``, ``x + ls2(ffn(norm2(x)))``.

  In training, ``drop_path_rate`` drops residual branches: per sample
  (``drop_path_mode='sample'``, timm's) or DINOv2's exact subset per group of
  ``rows / drop_path_groups`` rows (``'subset'``: what DINOv2's student runs,
  its nested-tensor forward, at any rate > 0). ``act`` is the MLP's
  activation; ``causal`` masks attention to earlier tokens (text towers).
  """
  num_heads: int
  mlp_hidden_dim: int
  ffn: str = 'mlp'
  layerscale_init: float | None = 1e-5
  drop_path_rate: float = 0.0
  drop_path_mode: str = 'sample'
  drop_path_groups: int = 1
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  attention_impl: str = 'auto'
  act: str = 'gelu'
  causal: bool = False
  neuron_edit: NeuronEdit | None = None  # test-time registers (models/vit.py)

  @nn.compact
  def __call__(self, x, deterministic: bool = True, return_probs: bool = False):
    x = nn.with_logical_constraint(x, ('batch', 'tokens', 'embed'))
    attn = Attention(self.num_heads, self.dtype, self.attention_impl, self.causal, name='attn')
    norm1 = layer_norm(self.norm_eps, self.dtype, 'norm1')
    check_activation(self.act, self.ffn)
    if self.ffn == 'mlp':
      ffn = Mlp(self.mlp_hidden_dim, self.dtype, self.act, self.neuron_edit, name='mlp')
    else:
      ffn = SwiGLU(self.mlp_hidden_dim, self.dtype, self.neuron_edit, name='mlp')
    norm2 = layer_norm(self.norm_eps, self.dtype, 'norm2')
    scale1 = scale2 = lambda y: y
    if self.layerscale_init is not None:
      scale1 = LayerScale(self.layerscale_init, name='ls1')
      scale2 = LayerScale(self.layerscale_init, name='ls2')
    probs = None

    def attn_branch(y):
      nonlocal probs
      out, probs = attn(norm1(y), return_probs)
      return scale1(out)

    ffn_branch = lambda y: scale2(ffn(norm2(y)))
    check_drop_path_mode(self.drop_path_mode)
    if not deterministic and self.drop_path_rate > 0.0 and self.drop_path_mode == 'subset':
      if return_probs:
        raise ValueError('attention maps of a training pass with subset drop path would cover '
                         'only the subset: ask for them with train=False')
      for branch in (attn_branch, ffn_branch):
        x = add_residual_on_subset(x, branch, self.drop_path_rate, self.drop_path_groups,
                                   self.make_rng('dropout'))
      return x, probs
    x = x + DropPath(self.drop_path_rate)(attn_branch(x), deterministic)
    x = x + DropPath(self.drop_path_rate)(ffn_branch(x), deterministic)
    return x, probs
