"""One optimiser for every recipe, configured by a table of parameter groups.

Each method we reproduce trains with AdamW or LAMB plus a handful of
per-parameter exceptions: no weight decay on biases and norms, a smaller lr
on the patch embedding, prototypes frozen for the first epoch, layer-wise lr
decay. Upstream these live in hand-built torch param groups; here they are
one table (``ParamGroup`` rows) in an ``OptimizerSpec``, and
``build_optimizer(spec)`` turns any spec into one optax chain::

  clip (per submodule | global) -> Adam moments -> per-parameter lr / weight decay
                                                   (AdamW, or LAMB's trust ratio)

so a recipe states only its numbers and its table (DINOv2's in
``recipes/dinov2_optim.py``, DeiT-III's in ``recipes/deit3.py``), and the
update arithmetic is shared and tested once.

The table. A row ``ParamGroup(pattern, lr_mult, wd_mult, frozen_steps)``
applies to every parameter whose '/'-joined dict path (e.g.
``backbone/blocks_3/attn/qkv/kernel``; flax box attributes such as ``.value``
are skipped) is matched by ``re.search(pattern, path)``. Every matching row
applies: lr and wd multipliers multiply, ``frozen_steps`` is the max over the
matching rows. A parameter matched by no row has multipliers 1 and is never
frozen. While frozen (``step < frozen_steps``) a parameter's lr is 0 but its
Adam moments keep accumulating, as in torch with ``lr = 0``. Layer-wise lr
decay is a table-level setting (``layerwise_decay``, under ``backbone_key``):
``layerwise_decay ** (L + 1 - layer_id)`` with tokens and patch embed layer
0, block ``i`` layer ``i + 1``, everything else ``L + 1`` (heads included);
scanned ``blocks`` (leading layers axis) get a per-layer ``[L, 1, ...]``
vector. Multipliers are derived at trace time from the update tree's keys,
so the state holds only Adam moments and step counts: plain arrays, shardable
like the params.

The update, with ``lr(t)``, ``wd(t)`` the spec's schedules, ``rate = lr(t) *
lr_mult`` (0 while frozen) and ``u = m_hat / (sqrt(v_hat) + eps)`` from
bias-corrected Adam moments of the clipped gradient:

- ``kind='adamw'`` (torch ``AdamW``, one param group per multiplier):
  ``p -= rate * (u + wd(t) * wd_mult * p)``;
- ``kind='lamb'`` (apex ``FusedLAMB``, ``adam_w_mode=True``,
  ``use_nvlamb=False``): ``d = u + wd(t) * wd_mult * p``;
  ``p -= rate * r * d`` with the trust ratio ``r = ||p|| / ||d||`` per
  parameter tensor (per layer slice for scanned ``blocks``), ``r = 1`` if
  either norm is 0, and ``r = 1`` (the plain Adam step) where the effective
  weight decay ``wd(t) * wd_mult`` is 0.

Clipping: ``clip_by='submodule'`` scales each top-level subtree (``backbone``,
``dino_head``, ...) by its own norm, ``'global'`` all gradients by one norm;
both ``g * min(1, clip_grad / (norm + clip_eps))``. ``clip_eps=1e-6`` is torch
``clip_grad_norm_``; apex/timm LAMB's built-in ``max_grad_norm`` clip is
``g / max(1, norm / max_norm)``, i.e. ``clip_eps=0``.

Sources, read for their semantics:

- DINOv2 (``dinov2_groups``, ``dinov2_spec``): facebookresearch/dinov2
  ``dinov2/utils/param_groups.py`` (layer decay, patch embed lr 0.2, no wd on
  ``*.bias`` / ``*norm*`` / ``*gamma*``, ``last_layer`` frozen) and
  ``dinov2/train/train.py`` (AdamW, per-submodule ``clip_grad_norm_``,
  schedules). The numbers are bit-identical to our DINOv2 optimiser before
  this table existed (Adam moments are ``optax.scale_by_adam``'s).
- DeiT-III (``deit3_groups``, ``deit3_spec``): facebookresearch/deit
  ``README_revenge.md`` (``--opt fusedlamb --weight-decay 0.05``),
  ``main.py`` (``--opt-eps 1e-8``, betas apex's default, no extra clip) and
  ``models_v2.py`` (``no_weight_decay = {pos_embed, cls_token}``); timm's
  ``create_optimizer`` puts every 1-D param (bias, LayerNorm weight,
  LayerScale gamma) and those names in a group with weight decay 0.
- LAMB: NVIDIA/apex ``apex/optimizers/fused_lamb.py`` (defaults
  ``max_grad_norm=1.0``, ``use_nvlamb=False``; one global grad norm over all
  groups) and ``csrc/multi_tensor_lamb.cu`` (stage 1: ``g / (norm / max)``
  if ``norm > max``, moments, ``m_hat / (sqrt(v_hat) + eps) + decay * p``;
  stage 2: ``lr * ||p|| / ||update||`` per tensor only if ``decay != 0`` or
  nvlamb, ratio ``lr`` if either norm is 0). timm ``timm.optim.Lamb``
  (``always_adapt=False``) does the same and is the test's reference. LAMB's
  bias corrections ``1 - b ** t`` are computed accurately as
  ``-expm1(t log b)`` (float32 ``1 - b ** t`` loses ~1e-5 relative in the
  first steps); apex passes ``b`` to its kernel as a C float, a ~1e-5
  relative difference at step 1 that fades as ``t`` grows.
"""

import dataclasses
import math
import numbers
import re
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitreg_jax import config as config_lib
from vitreg_jax.train import schedules


LAYER_ZERO_PARAMS = ('patch_embed', 'pos_embed', 'cls_token', 'register_tokens', 'mask_token')
SCANNED_BLOCKS = 'blocks'  # our ViT's nn.scan name: leaves under it have a leading layers axis
_BLOCK_RE = re.compile(r'^blocks_(\d+)$')
CLIP_EPS = 1e-6  # torch clip_grad_norm_: max_norm / (total_norm + 1e-6)
KINDS = ('adamw', 'lamb')
CLIP_BY = ('submodule', 'global')

Schedule = Callable[[jax.Array], jax.Array]


def dict_path(path) -> tuple[str, ...]:
  """The dict keys of a pytree path, skipping box attributes such as ``.value``."""
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


# ---------------------------------------------------------------------------
# The table.


@dataclasses.dataclass(frozen=True)
class ParamGroup:
  """One table row: parameters whose '/'-joined path ``re.search``-matches ``pattern``.

  Every matching row applies: lr and wd multipliers multiply, ``frozen_steps``
  (lr 0 for steps ``< frozen_steps``; moments still accumulate) is the max.
  """
  pattern: str
  lr_mult: float = 1.0
  wd_mult: float = 1.0
  frozen_steps: int = 0

  def __post_init__(self):
    if not isinstance(self.pattern, str):
      raise ValueError(f'ParamGroup pattern must be a regex string, got {self.pattern!r}')
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f'ParamGroup pattern {self.pattern!r} is not a valid regex: {e}') from None
    for name in ('lr_mult', 'wd_mult'):
      value = getattr(self, name)
      if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
        raise ValueError(f'ParamGroup({self.pattern!r}): {name}={value!r} must be a finite number >= 0')
    if not isinstance(self.frozen_steps, numbers.Integral) or self.frozen_steps < 0:
      raise ValueError(
          f'ParamGroup({self.pattern!r}): frozen_steps={self.frozen_steps!r} must be an int >= 0')

  def matches(self, path: str) -> bool:
    return re.search(self.pattern, path) is not None


def group_multipliers(path: str, groups: Sequence[ParamGroup]) -> tuple[float, float, int]:
  """``(lr_mult, wd_mult, frozen_steps)`` of the rows matching ``path`` (1, 1, 0 if none)."""
  lr_mult, wd_mult, frozen = 1.0, 1.0, 0
  for g in groups:
    if g.matches(path):
      lr_mult *= g.lr_mult
      wd_mult *= g.wd_mult
      frozen = max(frozen, int(g.frozen_steps))
  return lr_mult, wd_mult, frozen


# ---------------------------------------------------------------------------
# Layer-wise lr decay.


def _top_level(tree, key):
  try:
    return tree[key]
  except (KeyError, TypeError):
    keys = list(tree) if hasattr(tree, 'keys') else type(tree).__name__
    raise ValueError(f'params have no {key!r} subtree; top-level keys: {keys}') from None


def backbone_depth(backbone_params) -> int:
  """Number of ViT blocks: ``blocks_{i}`` entries, or the leading axis of scanned ``blocks``."""
  unrolled = [int(m.group(1)) for k in backbone_params if (m := _BLOCK_RE.match(str(k)))]
  if SCANNED_BLOCKS in backbone_params:
    if unrolled:
      raise ValueError('backbone params hold both scanned `blocks` and `blocks_{i}` entries')
    sizes = sorted({leaf.shape[0] for leaf in jax.tree.leaves(backbone_params[SCANNED_BLOCKS])})
    if len(sizes) != 1:
      raise ValueError(f'scanned blocks disagree on the layers axis: sizes {sizes}')
    return sizes[0]
  if sorted(unrolled) != list(range(len(unrolled))):
    raise ValueError(f'backbone blocks are not numbered 0..n-1: {sorted(unrolled)}')
  return len(unrolled)


def layer_decay_multiplier(path: tuple[str, ...], shape, depth: int, layerwise_decay: float,
                           backbone_key: str = 'backbone'):
  """``layerwise_decay ** (L + 1 - layer_id)``: a float, or float64 ``[L, 1, ...]`` if scanned."""
  if not path or path[0] != backbone_key:
    return 1.0  # heads: the reference gives them layer L + 1, i.e. decay ** 0
  name = path[1] if len(path) > 1 else ''
  if name in LAYER_ZERO_PARAMS:
    layer_id = 0
  elif m := _BLOCK_RE.match(name):
    layer_id = int(m.group(1)) + 1
  elif name == SCANNED_BLOCKS:
    if not shape or shape[0] != depth:
      raise ValueError(f'scanned param {"/".join(path)} shape {shape}: leading axis != depth {depth}')
    layer_id = (np.arange(depth) + 1).reshape((depth,) + (1,) * (len(shape) - 1))
  else:
    layer_id = depth + 1
  return np.power(layerwise_decay, depth + 1 - np.asarray(layer_id, np.float64))


# ---------------------------------------------------------------------------
# Per-leaf rules from the table.


@dataclasses.dataclass(frozen=True)
class LeafRule:
  """What the table says for one parameter (a pytree leaf, not a node)."""
  lr_mult: float | np.ndarray  # float, or float32 [L, 1, ...] for scanned blocks
  wd_mult: float
  frozen_steps: int
  stacked: bool  # under scanned `blocks`: LAMB's trust ratio per layer slice


def leaf_rules(params, groups: Sequence[ParamGroup], layerwise_decay: float | None = None,
               backbone_key: str = 'backbone'):
  """A ``LeafRule`` per leaf of ``params`` (arrays or shapes; flax boxes looked through)."""
  depth = None
  if layerwise_decay is not None:
    depth = backbone_depth(_top_level(params, backbone_key))

  def per_leaf(path, leaf):
    p = dict_path(path)
    lr_mult, wd_mult, frozen = group_multipliers('/'.join(p), groups)
    if depth is not None:
      layer = layer_decay_multiplier(p, tuple(leaf.shape), depth, layerwise_decay, backbone_key)
      mult = layer * lr_mult
      lr_mult = mult.astype(np.float32) if isinstance(mult, np.ndarray) and mult.ndim else float(mult)
    return LeafRule(lr_mult, wd_mult, frozen, SCANNED_BLOCKS in p)

  return jax.tree_util.tree_map_with_path(per_leaf, params)


def table_multipliers(params, groups: Sequence[ParamGroup], layerwise_decay: float | None = None,
                      backbone_key: str = 'backbone'):
  """``(lr_mult, wd_mult, frozen_steps)`` trees matching ``params``, for inspection."""
  rules = leaf_rules(params, groups, layerwise_decay, backbone_key)
  pick = lambda name: jax.tree.map(lambda r: getattr(r, name), rules)
  return pick('lr_mult'), pick('wd_mult'), pick('frozen_steps')


# ---------------------------------------------------------------------------
# Clipping.


def submodule_global_norms(tree) -> dict:
  """Global L2 norm of each top-level subtree (gradient norms for logging)."""
  sq = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = dict_path(path)[0]
    sq[key] = sq.get(key, 0.0) + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
  return {k: jnp.sqrt(v) for k, v in sq.items()}


def clip_by_global_norm_per_submodule(max_norm: float,
                                      eps: float = CLIP_EPS) -> optax.GradientTransformation:
  """Clips each top-level subtree by its own global norm (torch ``clip_grad_norm_``)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    coefs = {k: jnp.minimum(1.0, max_norm / (n + eps))
             for k, n in submodule_global_norms(updates).items()}
    clipped = jax.tree_util.tree_map_with_path(
        lambda path, g: (g * coefs[dict_path(path)[0]]).astype(g.dtype), updates)
    return clipped, state

  return optax.GradientTransformation(init_fn, update_fn)


def clip_by_global_norm(max_norm: float, eps: float = CLIP_EPS) -> optax.GradientTransformation:
  """``g * min(1, max_norm / (norm + eps))`` with one norm over all leaves."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(updates))
    coef = jnp.minimum(1.0, max_norm / (jnp.sqrt(sq) + eps))
    return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# Adam moments.


def _bias_correction(decay: float, count):
  """``1 - decay ** count`` to float32 accuracy, as ``-expm1(count * log(decay))``."""
  if decay == 0.0:
    return jnp.ones([], jnp.float32)
  return -jnp.expm1(count.astype(jnp.float32) * math.log(decay))


def scale_by_adam_accurate(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """``optax.scale_by_adam`` (same state) with accurate bias corrections (LAMB's moments)."""

  def init_fn(params):
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params),
                                  nu=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    bc1, bc2 = _bias_correction(b1, count), _bias_correction(b2, count)
    new = jax.tree.map(lambda m, v: (m / bc1.astype(m.dtype))
                       / (jnp.sqrt(v / bc2.astype(v.dtype)) + eps), mu, nu)
    return new, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# The spec and the chain.


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """Everything ``build_optimizer`` needs; see the module docstring.

  ``learning_rate`` and ``weight_decay`` are functions of the step (the
  number of updates applied so far, traced) or constants. ``clip_grad`` of
  ``None`` or 0 disables clipping. ``layerwise_decay=None`` disables
  layer-wise lr decay (and the need for a ``backbone_key`` subtree).
  """
  learning_rate: Schedule | float
  weight_decay: Schedule | float = 0.0
  groups: tuple[ParamGroup, ...] = ()
  kind: str = 'adamw'
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_grad: float | None = None
  clip_by: str = 'global'
  clip_eps: float = CLIP_EPS
  layerwise_decay: float | None = None
  backbone_key: str = 'backbone'

  def __post_init__(self):
    object.__setattr__(self, 'groups', tuple(self.groups))
    if self.kind not in KINDS:
      raise ValueError(f'optimizer kind={self.kind!r}; valid: {", ".join(map(repr, KINDS))}')
    if self.clip_by not in CLIP_BY:
      raise ValueError(f'clip_by={self.clip_by!r}; valid: {", ".join(map(repr, CLIP_BY))}')
    if self.layerwise_decay is not None and not 0.0 < self.layerwise_decay <= 1.0:
      raise ValueError(f'layerwise_decay={self.layerwise_decay} must lie in (0, 1]')
    if self.clip_grad is not None and self.clip_grad < 0:
      raise ValueError(f'clip_grad={self.clip_grad} must be >= 0 (None or 0: no clipping)')
    for name in ('b1', 'b2'):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f'{name}={getattr(self, name)} must lie in [0, 1)')
    for name in ('eps', 'clip_eps'):
      if getattr(self, name) < 0:
        raise ValueError(f'{name}={getattr(self, name)} must be >= 0')
    for g in self.groups:
      if not isinstance(g, ParamGroup):
        raise ValueError(f'groups must hold ParamGroup rows, got {g!r}')


def _schedule(value: Schedule | float) -> Schedule:
  if callable(value):
    return value
  return lambda step: jnp.asarray(value, jnp.float32)


class ScheduleState(NamedTuple):
  count: jax.Array  # number of updates applied so far = the schedules' step


ScaleByDinoV2State = ScheduleState  # its name before the table


def scale_by_table(spec: OptimizerSpec) -> optax.GradientTransformation:
  """Adam direction ``u`` -> the parameter update: per-param lr, weight decay, LAMB trust ratio."""
  lr_fn, wd_fn = _schedule(spec.learning_rate), _schedule(spec.weight_decay)

  def init_fn(params):
    del params
    return ScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('this optimiser applies weight decay: pass params to update()')
    rules = leaf_rules(updates, spec.groups, spec.layerwise_decay, spec.backbone_key)
    step = state.count
    lr = lr_fn(step)
    wd = wd_fn(step)

    def rate_of(rule):
      base = jnp.where(step < rule.frozen_steps, 0.0, lr) if rule.frozen_steps else lr
      return base * rule.lr_mult

    def adamw(u, p, rule):  # torch AdamW; this expression order is DINOv2's since its first runs
      wm = rule.wd_mult
      decayed = u + (wd * wm) * p if wm else u
      return (-rate_of(rule) * decayed).astype(u.dtype)

    def lamb(u, p, rule):
      wm = rule.wd_mult
      if not wm:  # no weight decay: apex skips the trust ratio (use_nvlamb=False)
        return (-rate_of(rule) * u).astype(u.dtype)
      decay = wd * wm
      decayed = u + decay * p
      axes = tuple(range(1, p.ndim)) if rule.stacked else None
      norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes,
                                        keepdims=rule.stacked))
      p_norm, d_norm = norm(p), norm(decayed)
      trust = jnp.where((p_norm > 0) & (d_norm > 0), p_norm / jnp.where(d_norm > 0, d_norm, 1.0),
                        1.0)
      trust = jnp.where(decay != 0, trust, 1.0)  # a wd schedule at 0: apex's plain step too
      return (-(rate_of(rule) * trust) * decayed).astype(u.dtype)

    scale = adamw if spec.kind == 'adamw' else lamb
    new = jax.tree.map(scale, updates, params, rules)
    return new, ScheduleState(count=optax.safe_increment(step))

  return optax.GradientTransformation(init_fn, update_fn)


def build_optimizer(spec: OptimizerSpec) -> optax.GradientTransformation:
  """Clip -> Adam moments -> ``scale_by_table``: ``optax.chain`` of 3 (2 without clipping).

  ``update(grads, state, params)`` needs ``params``. The state is
  ``(clip EmptyState, ScaleByAdamState, ScheduleState)``.
  """
  if not isinstance(spec, OptimizerSpec):
    raise ValueError(f'build_optimizer takes an OptimizerSpec, got {type(spec).__name__}')
  parts = []
  if spec.clip_grad:
    clipping = clip_by_global_norm_per_submodule if spec.clip_by == 'submodule' else clip_by_global_norm
    parts.append(clipping(spec.clip_grad, spec.clip_eps))
  if spec.kind == 'adamw':
    parts.append(optax.scale_by_adam(b1=spec.b1, b2=spec.b2, eps=spec.eps))
  else:
    parts.append(scale_by_adam_accurate(spec.b1, spec.b2, spec.eps))
  parts.append(scale_by_table(spec))
  return optax.chain(*parts)


def from_config(o, groups: Sequence[ParamGroup],
                total_steps: int) -> tuple[Schedule, optax.GradientTransformation]:
  """The shared ``optim.*`` section -> ``(lr schedule, optimizer)`` with ``groups``' table.

  Linear warmup over ``warmup_epochs`` (may be fractional) from ``warmup_init_lr``,
  then cosine to ``min_lr``, per step; AdamW or LAMB (apex's clip without epsilon).
  """
  config_lib.check_choice(o.optimizer, ('adamw', 'lamb'), 'optim.optimizer')
  warmup = int(round(float(o.warmup_epochs) * int(o.epoch_length)))
  if not 0 <= warmup < total_steps:
    raise config_lib.ConfigError(
        f'optim.warmup_epochs={o.warmup_epochs} must be below optim.epochs={o.epochs}')
  learning_rate = lambda step: schedules.cosine_schedule(
      step, o.base_lr, o.min_lr, total_steps, warmup_steps=warmup,
      start_warmup_value=o.warmup_init_lr)
  tx = build_optimizer(OptimizerSpec(
      groups=tuple(groups), learning_rate=learning_rate, weight_decay=float(o.weight_decay),
      kind=o.optimizer, b1=o.b1, b2=o.b2, eps=o.eps, clip_grad=o.clip_grad or None,
      clip_by=o.clip_by, clip_eps=0.0 if o.optimizer == 'lamb' else CLIP_EPS,
      layerwise_decay=None if o.layerwise_decay == 1.0 else o.layerwise_decay))
  return learning_rate, tx
