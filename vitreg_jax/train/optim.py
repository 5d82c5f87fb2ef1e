"""DINOv2's optimiser as an optax chain, driven by our parameter names.

Follows ``dinov2/utils/param_groups.py`` and ``dinov2/train/train.py``:

- per-submodule gradient clipping (each top-level subtree of the student,
  e.g. ``backbone``, ``dino_head``, ``ibot_head``, by its own global norm,
  torch ``clip_grad_norm_`` semantics: ``g * min(1, max / (norm + 1e-6))``);
- Adam moments (0.9, 0.999, eps 1e-8), then decoupled weight decay and the
  learning rate, both multiplied per parameter, as torch ``AdamW`` with one
  param group per multiplier: ``p -= lr * lr_mult * (adam + wd * wd_mult * p)``;
- lr multiplier ``layerwise_decay ** (L + 1 - layer_id)`` in the backbone
  (tokens and patch embed layer 0, block ``i`` layer ``i + 1``, the rest
  ``L + 1``), times ``patch_embed_lr_mult`` on the patch embedding; heads 1;
- no weight decay where the reference name ends in ``.bias`` or contains
  ``norm`` or ``gamma`` (biases, LayerNorms, LayerScale); tokens, kernels and
  the prototypes' ``weight_g``/``weight_v`` are decayed, as upstream;
- ``last_layer`` params (the heads' prototypes) follow the lr schedule with
  the first ``freeze_last_layer_epochs`` at 0: frozen, but their Adam moments
  keep accumulating, as in torch.

Multipliers are derived at trace time from the update tree's dict keys (flax
``LogicallyPartitioned`` boxes are looked through), so the state holds only
Adam moments and a step count: plain arrays, shardable like the params.
Scanned blocks (``blocks`` with a leading layers axis) get a per-layer
multiplier vector broadcast along that axis.
"""

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitreg_jax.train.schedules import DinoV2Schedules

LAYER_ZERO_PARAMS = ('patch_embed', 'pos_embed', 'cls_token', 'register_tokens', 'mask_token')
_BLOCK_RE = re.compile(r'^blocks_(\d+)$')
CLIP_EPS = 1e-6  # torch clip_grad_norm_: max_norm / (total_norm + 1e-6)


def dict_path(path) -> tuple[str, ...]:
  """The dict keys of a pytree path, skipping box attributes such as ``.value``."""
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _top_level(tree, key):
  try:
    return tree[key]
  except (KeyError, TypeError):
    keys = list(tree) if hasattr(tree, 'keys') else type(tree).__name__
    raise ValueError(f'params have no {key!r} subtree; top-level keys: {keys}') from None


def backbone_depth(backbone_params) -> int:
  """Number of ViT blocks: ``blocks_{i}`` entries, or the leading axis of scanned ``blocks``."""
  unrolled = [int(m.group(1)) for k in backbone_params if (m := _BLOCK_RE.match(str(k)))]
  if 'blocks' in backbone_params:
    if unrolled:
      raise ValueError('backbone params hold both scanned `blocks` and `blocks_{i}` entries')
    sizes = sorted({leaf.shape[0] for leaf in jax.tree.leaves(backbone_params['blocks'])})
    if len(sizes) != 1:
      raise ValueError(f'scanned blocks disagree on the layers axis: sizes {sizes}')
    return sizes[0]
  if sorted(unrolled) != list(range(len(unrolled))):
    raise ValueError(f'backbone blocks are not numbered 0..n-1: {sorted(unrolled)}')
  return len(unrolled)


def lr_multiplier(path: tuple[str, ...], shape, depth: int, layerwise_decay: float,
                  patch_embed_lr_mult: float, backbone_key: str = 'backbone'):
  """Per-parameter lr multiplier: a float, or ``[L, 1, ...]`` for scanned blocks."""
  if not path or path[0] != backbone_key:
    return 1.0  # heads: the reference gives them layer L + 1, i.e. decay ** 0
  name = path[1] if len(path) > 1 else ''
  if name in LAYER_ZERO_PARAMS:
    layer_id = 0
  elif m := _BLOCK_RE.match(name):
    layer_id = int(m.group(1)) + 1
  elif name == 'blocks':
    if not shape or shape[0] != depth:
      raise ValueError(f'scanned param {"/".join(path)} shape {shape}: leading axis != depth {depth}')
    layer_id = (np.arange(depth) + 1).reshape((depth,) + (1,) * (len(shape) - 1))
  else:
    layer_id = depth + 1
  mult = np.power(layerwise_decay, depth + 1 - np.asarray(layer_id, np.float64))
  if 'patch_embed' in path:
    mult = mult * patch_embed_lr_mult
  return mult.astype(np.float32) if isinstance(mult, np.ndarray) and mult.ndim else float(mult)


def weight_decay_multiplier(path: tuple[str, ...]) -> float:
  """0 for what the reference names ``*.bias``, ``*norm*``, ``*gamma*``; else 1."""
  if path and path[-1] == 'bias':
    return 0.0
  if any('norm' in p or 'gamma' in p for p in path):
    return 0.0
  return 1.0


def is_last_layer(path: tuple[str, ...]) -> bool:
  """The heads' prototype layer, frozen for the first epoch(s)."""
  return 'last_layer' in path


def param_multipliers(params, layerwise_decay: float = 0.9, patch_embed_lr_mult: float = 0.2,
                      backbone_key: str = 'backbone'):
  """``(lr_mult, wd_mult, last_layer)`` trees matching ``params`` (arrays or shapes).

  ``params`` is the student tree ``{backbone_key: vit_params, 'dino_head': ...,
  ['ibot_head': ...]}``, each as ``module.init(...)['params']``.
  """
  depth = backbone_depth(_top_level(params, backbone_key))

  def per_leaf(path, leaf):
    p = dict_path(path)
    return (lr_multiplier(p, tuple(leaf.shape), depth, layerwise_decay, patch_embed_lr_mult,
                          backbone_key),
            weight_decay_multiplier(p), is_last_layer(p))

  triples = jax.tree_util.tree_map_with_path(per_leaf, params)
  is_triple = lambda x: isinstance(x, tuple)
  pick = lambda i: jax.tree.map(lambda t: t[i], triples, is_leaf=is_triple)
  return pick(0), pick(1), pick(2)


def submodule_global_norms(tree) -> dict:
  """Global L2 norm of each top-level subtree (gradient norms for logging)."""
  sq = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = dict_path(path)[0]
    sq[key] = sq.get(key, 0.0) + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
  return {k: jnp.sqrt(v) for k, v in sq.items()}


def clip_by_global_norm_per_submodule(max_norm: float) -> optax.GradientTransformation:
  """Clips each top-level subtree by its own global norm (torch ``clip_grad_norm_``)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    coefs = {k: jnp.minimum(1.0, max_norm / (n + CLIP_EPS))
             for k, n in submodule_global_norms(updates).items()}
    clipped = jax.tree_util.tree_map_with_path(
        lambda path, g: (g * coefs[dict_path(path)[0]]).astype(g.dtype), updates)
    return clipped, state

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByDinoV2State(NamedTuple):
  count: jax.Array  # number of updates applied so far = the schedules' step


def scale_by_dinov2_lr_and_wd(schedules: DinoV2Schedules, layerwise_decay: float,
                              patch_embed_lr_mult: float,
                              backbone_key: str = 'backbone') -> optax.GradientTransformation:
  """``u -> -lr(t) * lr_mult * (u + wd(t) * wd_mult * p)``, torch AdamW's decoupled decay."""

  def init_fn(params):
    del params
    return ScaleByDinoV2State(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('the DINOv2 optimiser applies weight decay: pass params to update()')
    lr_mult, wd_mult, last = param_multipliers(updates, layerwise_decay, patch_embed_lr_mult,
                                               backbone_key)
    step = state.count
    lr = schedules.learning_rate(step)
    last_lr = schedules.last_layer_learning_rate(step)
    wd = schedules.weight_decay_value(step)

    def scale(u, p, lm, wm, is_last):
      rate = (last_lr if is_last else lr) * lm
      decayed = u + (wd * wm) * p if wm else u
      return (-rate * decayed).astype(u.dtype)

    new = jax.tree.map(scale, updates, params, lr_mult, wd_mult, last)
    return new, ScaleByDinoV2State(count=optax.safe_increment(step))

  return optax.GradientTransformation(init_fn, update_fn)


def dinov2_optimizer(schedules: DinoV2Schedules, layerwise_decay: float = 0.9,
                     patch_embed_lr_mult: float = 0.2, clip_grad: float | None = 3.0,
                     b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                     backbone_key: str = 'backbone') -> optax.GradientTransformation:
  """Clip per submodule -> Adam moments -> per-param lr / weight decay (module docstring).

  Use on the student tree ``{backbone_key: ..., 'dino_head': ..., ['ibot_head': ...]}``;
  ``update(grads, state, params)`` needs ``params``. ``clip_grad`` of ``None``
  or 0 disables clipping, as ``optim.clip_grad`` does upstream.
  """
  if not 0.0 < layerwise_decay <= 1.0:
    raise ValueError(f'layerwise_decay={layerwise_decay} must lie in (0, 1]')
  parts = []
  if clip_grad:
    parts.append(clip_by_global_norm_per_submodule(clip_grad))
  parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  parts.append(scale_by_dinov2_lr_and_wd(schedules, layerwise_decay, patch_embed_lr_mult,
                                         backbone_key))
  return optax.chain(*parts)
