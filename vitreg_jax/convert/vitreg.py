"""Our own export: a folder readable without torch.

``config.json`` holds ``{"format": "vitreg", "version": 1, "model": {...}}``
with the architecture fields of ``VisionTransformer`` (``arch.ARCH_FIELDS``);
the weights are our flat unscanned params, either ``model.safetensors``
(names like ``blocks_0/attn/qkv/kernel``) or ``model.msgpack`` (flax
serialisation of the nested param dict).
"""

import os

from flax import serialization, traverse_util

from vitreg_jax.convert import dinov2, layout, tensor_files
from vitreg_jax.convert.arch import ARCH_FIELDS
from vitreg_jax.convert.checks import ConversionError

NAME = 'vitreg'
VERSION = 1
WEIGHT_FILES = {'safetensors': 'model.safetensors', 'msgpack': 'model.msgpack'}
WRITE_OPTIONS = ('weights',)


def _read_msgpack(path: str) -> dict:
  with open(path, 'rb') as f:
    tree = serialization.msgpack_restore(f.read())
  return traverse_util.flatten_dict(tree, sep='/')


def read(path: str):
  config_path = os.path.join(path, 'config.json')
  if not os.path.isfile(config_path):
    raise ConversionError(f'{path}: not a vitreg folder (no config.json)')
  config = tensor_files.read_json(config_path)
  if config.get('format') != NAME or config.get('version') != VERSION:
    raise ConversionError(
        f'{config_path}: format {config.get("format")!r} version {config.get("version")!r}; '
        f'expected {NAME!r} version {VERSION}')
  kwargs = config.get('model', {})
  unknown = sorted(set(kwargs) - set(ARCH_FIELDS))
  if unknown:
    raise ConversionError(
        f'{config_path}: unknown model fields {unknown}; valid: {list(ARCH_FIELDS)}')
  for kind, name in WEIGHT_FILES.items():
    weights = os.path.join(path, name)
    if os.path.isfile(weights):
      tensors = (_read_msgpack(weights) if kind == 'msgpack'
                 else tensor_files.read_tensors(weights))
      return tensors, kwargs
  raise ConversionError(f'{path}: no weights ({" or ".join(WEIGHT_FILES.values())})')


def hub_shapes(tensors: dict) -> dict:
  return layout.shapes_of(dinov2.ours_to_hub, tensors)


def convention(num_registers: int) -> dict:
  del num_registers
  return {}  # carried by config.json


def from_ours(ours: dict, model, like=None) -> dict:
  del model, like
  return dict(ours)


def to_ours(tensors: dict, expected: dict) -> dict:
  del expected
  return dict(tensors)


def write(tensors: dict, model, path: str, weights: str = 'safetensors') -> None:
  if weights not in WEIGHT_FILES:
    raise ConversionError(f'weights={weights!r}; valid: {sorted(WEIGHT_FILES)}')
  config = {'format': NAME, 'version': VERSION,
            'model': {k: getattr(model, k) for k in ARCH_FIELDS}}
  with tensor_files.atomic_dir(path) as tmp:
    target = os.path.join(tmp, WEIGHT_FILES[weights])
    if weights == 'msgpack':
      with open(target, 'wb') as f:
        f.write(serialization.msgpack_serialize(traverse_util.unflatten_dict(tensors, sep='/')))
    else:
      tensor_files.write_tensors(tensors, target, metadata={'format': NAME})
    tensor_files.write_json(config, os.path.join(tmp, 'config.json'))
  for kind, name in WEIGHT_FILES.items():  # a stale file of the other kind would shadow this one
    if kind != weights and os.path.isfile(os.path.join(path, name)):
      os.remove(os.path.join(path, name))
