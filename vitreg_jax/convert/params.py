"""Our side of every conversion: the flat, unscanned, unboxed parameter dict.

Converters see ``{'blocks_0/attn/qkv/kernel': array, ...}`` whatever the
model's ``scan_blocks`` setting: scanned trees (one ``blocks`` subtree with a
leading layer axis) are split into ``blocks_{i}`` here and stacked back when a
scanned model is loaded. Imported params are plain (unboxed) numpy float32
arrays; place them with ``jax.device_put`` and the shardings you want.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

_BLOCK = re.compile(r'^blocks_(\d+)/(.*)$')
_SCANNED = 'blocks/'


def flatten(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep='/')


def canonical(variables) -> dict:
  """Flat unscanned numpy params from ``{'params': ...}`` or a bare param tree."""
  tree = nn.meta.unbox(variables)
  tree = tree.get('params', tree)
  flat = {}
  for name, x in flatten(tree).items():
    if name.startswith(_SCANNED):
      rest = name[len(_SCANNED):]
      for i, layer in enumerate(np.asarray(x)):
        flat[f'blocks_{i}/{rest}'] = layer
    else:
      flat[name] = np.asarray(x)
  return flat


def to_variables(flat: dict, scan_blocks: bool) -> dict:
  """``{'params': nested}`` for a model, stacking ``blocks_{i}`` when scanned."""
  if scan_blocks:
    per_layer = {}
    rest = {}
    for name, x in flat.items():
      m = _BLOCK.match(name)
      if m:
        per_layer.setdefault(m.group(2), {})[int(m.group(1))] = x
      else:
        rest[name] = x
    for name, layers in per_layer.items():
      rest[_SCANNED + name] = np.stack([layers[i] for i in range(len(layers))])
    flat = rest
  return {'params': traverse_util.unflatten_dict(flat, sep='/')}


def expected_shapes(model) -> dict:
  """Flat unscanned ``{name: ShapeDtypeStruct}`` of the model's params (nothing allocated)."""
  model = model.clone(scan_blocks=False)
  images = jax.ShapeDtypeStruct((1, model.img_size, model.img_size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  return flatten(nn.meta.unbox(shapes)['params'])


# Two-tower (CLIP) models: the same flat form per tower, under 'visual/' and 'text/'.
TOWERS = ('visual', 'text')


def clip_canonical(variables) -> dict:
  """Flat unscanned numpy params of a ``models.clip.CLIP``: ``visual/...``, ``text/...``, top."""
  tree = nn.meta.unbox(variables)
  tree = tree.get('params', tree)
  flat = {k: np.asarray(v) for k, v in tree.items() if k not in TOWERS}
  for tower in TOWERS:
    flat.update({f'{tower}/{k}': v for k, v in canonical(tree[tower]).items()})
  return flat


def clip_to_variables(flat: dict, model) -> dict:
  """``{'params': nested}`` for a CLIP model, each tower stacked when it scans its blocks."""
  tree = {k: v for k, v in flat.items() if '/' not in k}
  for tower in TOWERS:
    prefix = f'{tower}/'
    part = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    tree[tower] = to_variables(part, getattr(model, tower).scan_blocks)['params']
  return {'params': tree}


def clip_expected_shapes(model) -> dict:
  """Flat unscanned ``{name: ShapeDtypeStruct}`` of a CLIP model's params (nothing allocated)."""
  model = model.clone(visual=model.visual.clone(scan_blocks=False),
                      text=model.text.clone(scan_blocks=False))
  size = model.visual.img_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, model.text.context_length), jnp.int32)
  shapes = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t), images, tokens)
  return flatten(nn.meta.unbox(shapes)['params'])
