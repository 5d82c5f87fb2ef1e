"""timm ``VisionTransformer`` state dicts (``vit_*_patch14_reg4_dinov2``, ``vit_*_patch16_*``).

Written as a map from the DINOv2 hub layout; the blocks share its names. The
differences are in the token embeddings:

* ``no_embed_class=True`` (DINOv2 register models, DeiT-III): ``pos_embed``
  covers the patches only and timm's ``cls_token`` is DINOv2's
  ``cls_token + pos_embed[:, 0]``. That sum cannot be split again, so on import
  it all goes to our ``cls_token`` and our ``pos_embed[:, 0]`` is zero: the
  outputs are identical.
* ``no_embed_class=False`` (original ViT, non-register timm DINOv2):
  ``pos_embed`` also covers cls and any registers; register entries are added
  into ``register_tokens`` on import (timm never resamples prefix entries).
* ``reg_token`` is ``register_tokens``; timm has no ``mask_token`` (zeros on
  import, dropped on export) and a classifier ``head`` we drop.
* The giant's SwiGLU is timm's ``SwiGLUPacked``: ``mlp.fc1`` is ``w12`` (gate
  half first), ``mlp.fc2`` is ``w3``.

timm resamples position embeddings by size with antialiased bicubic for every
model, so imports use that (``interpolate_antialias=True``, offset 0).

CLIP-style towers (timm's ``pre_norm=True``, e.g. ``vit_base_patch16_clip_224``)
have ``norm_pre`` and no patch-embedding bias, as our ``norm_pre=True,
patch_bias=False``; a model without a bias and without ``norm_pre`` is
exported with a zero bias. QuickGELU is ``act_layer='quick_gelu'`` in the
folder's config. timm's JSON config cannot name a LayerNorm eps: timm builds
eps 1e-6 (1e-5 models differ slightly; a warning says so).

Export options (``convert.save(model, variables, 'timm:PATH', **options)``):

* ``layout='dinov2'`` (default): ``no_embed_class=True`` for register models and
  the original layout otherwise, as timm's own DINOv2 models do.
* ``layout='deit3'``: ``no_embed_class=True`` for every model, with or without
  registers: the layout of timm's ``deit3_*`` models (``cls_token`` holds our
  ``cls_token + pos_embed[:, 0]``; the outputs are identical). The file loads
  strictly into e.g. ``timm.create_model('deit3_small_patch16_224',
  num_classes=C, reg_tokens=R, ...)``; a folder export names a ``deit3_*``
  architecture in its config.
* ``head=...``: the params of a classifier ``Dense`` (``{'kernel': [D, C],
  'bias': [C]}``, boxed or not, or ``{'params': {...}}``, e.g.
  ``variables["params"]["head"]`` of ``models.heads.ViTClassifier``),
  written as timm's ``head.weight [C, D]`` / ``head.bias [C]``. Without it no
  head is written (timm ``num_classes=0``).
* ``pool='cls'|'mean'``: what the head reads (``ViTClassifier.pool``); only the
  folder's config.json records it (timm ``global_pool='token'`` or
  ``'avg'`` with ``fc_norm=False``). Default: ``'cls'`` with a class token.

Imports drop any ``head`` (``convert.load`` returns the backbone only).
"""

import logging
import math
import os
import re

import flax.linen as nn
import numpy as np

from vitreg_jax.convert import dinov2, layout, tensor_files
from vitreg_jax.convert.checks import ConversionError

NAME = 'timm'
logger = logging.getLogger('vitreg_jax.convert')
_FC = re.compile(r'^(blocks\.\d+\.mlp\.)(fc1|fc2|w12|w3)(\.\w+)$')
_PACKED = {'fc1': 'w12', 'fc2': 'w3'}
_UNPACKED = {'w12': 'fc1', 'w3': 'fc2'}
_HEAD = ('head.weight', 'head.bias')
_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
_SIZE_NAMES = {384: 'small', 768: 'base', 1024: 'large'}  # timm's *_patch14_dinov2 names
_DEIT3_SIZES = {384: 'small', 512: 'medium', 768: 'base', 1024: 'large'}  # deit3_*_patch16_224
LAYOUTS = ('dinov2', 'deit3')
POOLS = ('cls', 'mean')  # as models.heads.ViTClassifier
WRITE_OPTIONS = ('layout', 'head', 'pool')
CONVERT_OPTIONS = ('layout', 'head')  # also passed to from_ours by convert.save


def _square(n: int) -> bool:
  return n >= 0 and math.isqrt(n) ** 2 == n


def embeds_class(num_pos: int, num_prefix: int) -> bool:
  """Whether a timm ``pos_embed`` of ``num_pos`` entries also covers the prefix tokens."""
  if num_prefix and _square(num_pos - num_prefix) and _square(num_pos):
    logger.warning('pos_embed length %d fits both timm layouts; assuming no_embed_class=True',
                   num_pos)
  return bool(num_prefix) and _square(num_pos - num_prefix) and not _square(num_pos)


def _swiglu_blocks(tensors: dict) -> set:
  """Block indices whose MLP is SwiGLUPacked (fc1 twice as wide as fc2's input)."""
  out = set()
  for name, x in tensors.items():
    m = re.match(r'^blocks\.(\d+)\.mlp\.fc1\.weight$', name)
    fc2 = tensors.get(f'blocks.{m.group(1)}.mlp.fc2.weight') if m else None
    if fc2 is not None and x.shape[0] == 2 * fc2.shape[1]:
      out.add(m.group(1))
  return out


def to_hub(tensors: dict) -> dict:
  """timm names and token layout -> DINOv2 hub (mask_token zeros)."""
  pos = tensors['pos_embed']
  cls, reg = tensors.get('cls_token'), tensors.get('reg_token')
  c = int(cls is not None)
  prefix = c + (reg.shape[1] if reg is not None else 0)
  dim = pos.shape[-1]
  hub = {'mask_token': layout.zeros((1, dim), pos)}
  if embeds_class(pos.shape[1], prefix):
    hub['pos_embed'] = layout.concat([pos[:, :c], pos[:, prefix:]], axis=1)
    if reg is not None:
      hub['register_tokens'] = reg + pos[:, c:prefix]
  else:
    hub['pos_embed'] = (layout.concat([layout.zeros((1, 1, dim), pos), pos], axis=1) if c else pos)
    if reg is not None:
      hub['register_tokens'] = reg
  if cls is not None:
    hub['cls_token'] = cls
  swiglu = _swiglu_blocks(tensors)
  for name, x in tensors.items():
    if name in ('pos_embed', 'cls_token', 'reg_token'):
      continue
    m = _FC.match(name)
    if m and name.split('.')[1] in swiglu:
      name = m.group(1) + _PACKED[m.group(2)] + m.group(3)
    hub[name] = x
  return hub


def _check_layout(name: str) -> None:
  if name not in LAYOUTS:
    raise ConversionError(f'timm layout={name!r}; valid: {LAYOUTS}')


def from_hub(hub: dict, model, like: dict | None = None, layout: str = 'dinov2') -> dict:
  """DINOv2 hub -> timm; the layout follows ``like`` (a timm dict) when given,
  else ``layout`` (see the module docstring)."""
  _check_layout(layout)
  c, r = int(model.class_token), model.num_registers
  pos = hub['pos_embed']
  if like is not None and 'pos_embed' in like:
    embed_class = embeds_class(like['pos_embed'].shape[1], c + r)
  elif layout == 'deit3':
    embed_class = False
  else:
    embed_class = r == 0
  out = {}
  if embed_class:
    if r:
      pos = layout.concat([pos[:, :c], layout.zeros((1, r, pos.shape[-1]), pos), pos[:, c:]], 1)
    out['pos_embed'] = pos
    if c:
      out['cls_token'] = hub['cls_token']
  else:
    out['pos_embed'] = pos[:, c:]
    if c:
      out['cls_token'] = hub['cls_token'] + pos[:, :1]
  if r:
    out['reg_token'] = hub['register_tokens']
  for name, x in hub.items():
    if name in ('pos_embed', 'cls_token', 'register_tokens', 'mask_token'):
      continue
    m = _FC.match(name)
    if m and m.group(2) in _UNPACKED:
      name = m.group(1) + _UNPACKED[m.group(2)] + m.group(3)
    out[name] = x
  return out


def read(path: str):
  carried = {}
  if os.path.isdir(path):
    config_path = os.path.join(path, 'config.json')
    if os.path.isfile(config_path):
      args = tensor_files.read_json(config_path).get('model_args', {})
      if 'num_heads' in args:
        carried['num_heads'] = args['num_heads']
    files = [os.path.join(path, f) for f in _WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
    if not files:
      raise ConversionError(f'{path}: no timm weights ({" or ".join(_WEIGHT_FILES)})')
    path = files[0]
  tensors = tensor_files.read_tensors(path)
  if any(k in tensors for k in _HEAD):
    shapes = [tuple(tensors[k].shape) for k in _HEAD if k in tensors]
    logger.info('dropped the classifier head %s', shapes)
    tensors = {k: v for k, v in tensors.items() if k not in _HEAD}
  logger.info('timm checkpoints have no mask_token: it is set to zeros')
  return tensors, carried


def hub_shapes(tensors: dict) -> dict:
  return layout.shapes_of(to_hub, tensors)


def convention(num_registers: int) -> dict:
  del num_registers
  return {'interpolate_antialias': True, 'interpolate_offset': 0.0}


def head_tensors(head, model) -> dict:
  """timm ``head.weight [C, D]``, ``head.bias [C]`` from a flax ``Dense``'s params."""
  tree = nn.meta.unbox(head)
  if isinstance(tree, dict) and set(tree) == {'params'}:
    tree = tree['params']
  if not isinstance(tree, dict) or set(tree) != {'kernel', 'bias'}:
    got = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
    raise ConversionError(f"head: expected the params of a Dense, {{'kernel', 'bias'}}; got {got}")
  kernel, bias = np.asarray(tree['kernel']), np.asarray(tree['bias'])
  if kernel.ndim != 2 or kernel.shape[0] != model.embed_dim or bias.shape != kernel.shape[1:]:
    raise ConversionError(
        f'head: kernel {kernel.shape} and bias {bias.shape} do not make a classifier on '
        f'embed_dim {model.embed_dim} (expected kernel [{model.embed_dim}, C], bias [C])')
  return {'head.weight': kernel.T, 'head.bias': bias}


def from_ours(ours: dict, model, like=None, layout: str = 'dinov2', head=None) -> dict:
  hub = dinov2.ours_to_hub(ours)
  if model.norm_pre and model.patch_bias:
    raise ConversionError('timm pre_norm models have no patch-embedding bias; this model has '
                          'norm_pre and a patch bias')
  if not model.norm_pre:
    hub = dinov2.with_patch_bias(hub)
  out = from_hub(hub, model, like, layout)
  if head is not None:
    out.update(head_tensors(head, model))
  return out


def to_ours(tensors: dict, expected: dict) -> dict:
  return dinov2.hub_to_ours(to_hub(tensors), expected)


def _pool(model, pool: str | None) -> str:
  if pool is None:
    return 'cls' if model.class_token else 'mean'
  if pool not in POOLS:
    raise ConversionError(f'pool={pool!r}; valid: {POOLS}')
  if pool == 'cls' and not model.class_token:
    raise ConversionError("pool='cls' needs a class token; this model has none (pool='mean')")
  return pool


def model_config(model, tensors: dict, layout: str = 'dinov2', pool: str | None = None) -> dict:
  """A timm hub-style ``config.json``: ``timm.create_model('local-dir:PATH', pretrained=True)``.

  ``num_classes`` follows the ``head.weight`` in ``tensors`` (0 without one).
  """
  _check_layout(layout)
  pool = _pool(model, pool)
  num_classes = int(tensors['head.weight'].shape[0]) if 'head.weight' in tensors else 0
  swiglu = model.ffn == 'swiglu'
  packed = model.mlp_hidden_dim * (2 if swiglu else 1)
  ratio = packed / model.embed_dim
  if int(model.embed_dim * ratio) != packed:
    ratio = (packed + 0.5) / model.embed_dim
  size = 'giant' if swiglu else _SIZE_NAMES.get(model.embed_dim, 'base')
  patch = model.patch_size
  reg = '_reg4' if model.num_registers else ''
  no_embed_class = tensors['pos_embed'].shape[1] == (model.img_size // patch) ** 2
  args = dict(
      img_size=model.img_size, patch_size=patch, embed_dim=model.embed_dim, depth=model.depth,
      num_heads=model.num_heads, mlp_ratio=ratio, init_values=model.layerscale_init,
      reg_tokens=model.num_registers, no_embed_class=no_embed_class,
      class_token=model.class_token, dynamic_img_size=True, num_classes=num_classes)
  if model.norm_pre:
    args['pre_norm'] = True
  if model.act != 'gelu':
    args['act_layer'] = model.act
  if model.norm_eps != 1e-6:
    logger.warning('timm builds LayerNorm eps 1e-6 from a config; this model uses %g, so its '
                   'outputs there differ slightly', model.norm_eps)
  if pool == 'mean':
    args.update(global_pool='avg', fc_norm=False)
  # Every field is in model_args: the architecture name only picks timm's entry point (and
  # the SwiGLU MLP class of the giant, which a JSON config cannot name).
  if layout == 'deit3' and not swiglu:
    architecture = f'deit3_{_DEIT3_SIZES.get(model.embed_dim, "base")}_patch16_224'
  else:
    architecture = f'vit_{size}_patch14{reg}_dinov2'
  return {
      'architecture': architecture,
      'num_classes': num_classes,
      'num_features': model.embed_dim,
      'global_pool': 'token' if pool == 'cls' else 'avg',
      'model_args': args,
      'pretrained_cfg': {
          'input_size': [3, model.img_size, model.img_size], 'interpolation': 'bicubic',
          'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225], 'crop_pct': 1.0,
          'num_classes': num_classes, 'fixed_input_size': False},
  }


def write(tensors: dict, model, path: str, layout: str = 'dinov2', head=None,
          pool: str | None = None) -> None:
  """A state dict file (``.safetensors``/``.pth``), or a folder timm can load by name.

  ``tensors`` already hold the ``layout`` and ``head`` (``from_ours``); ``layout`` and
  ``pool`` here only shape the folder's config.json.
  """
  del head
  config = model_config(model, tensors, layout, pool)  # validates before anything is written
  if path.endswith(('.safetensors',) + tensor_files.TORCH_SUFFIXES):
    with tensor_files.atomic_file(path) as tmp:
      tensor_files.write_tensors(tensors, tmp)
    return
  with tensor_files.atomic_dir(path) as tmp:
    tensor_files.write_tensors(tensors, os.path.join(tmp, 'model.safetensors'))
    tensor_files.write_json(config, os.path.join(tmp, 'config.json'))
