"""DINOv2 hub state dicts (``dinov2_vit{s,b,l,g}14[_reg]``): the hub of all torch formats.

Our names are DINOv2's with ``/`` for ``.``; only layouts differ (torch Linear
``[out, in]``, conv ``[O, I, kh, kw]``, and our explicit head / q-k-v / SwiGLU
half axes). timm and HF are written as maps from these names; the hub layout
also names timm's ``norm_pre`` (CLIP-style towers), which DINOv2 itself lacks.
A model without a patch-embedding bias is exported with a zero bias.

Training checkpoints are accepted too: the backbone is found under its prefix
(``teacher.backbone.`` preferred over the student's), heads are dropped, and
FSDP block chunks (``blocks.{chunk}.{i}.``) are flattened.
"""

import logging
import re

from vitreg_jax.convert import layout, tensor_files
from vitreg_jax.convert.checks import ConversionError
from vitreg_jax.convert.layout import CONV, LINEAR, VECTOR, Rule, Table, linear

NAME = 'dinov2'
logger = logging.getLogger('vitreg_jax.convert')

TABLE = Table((
    Rule('cls_token', 'cls_token'),
    Rule('register_tokens', 'register_tokens'),
    Rule('pos_embed', 'pos_embed'),
    Rule('mask_token', 'mask_token'),
    Rule('patch_embed/proj/kernel', 'patch_embed.proj.weight', CONV),
    Rule('patch_embed/proj/bias', 'patch_embed.proj.bias'),
    Rule('norm_pre/scale', 'norm_pre.weight'),  # timm's name (CLIP towers); DINOv2 has none
    Rule('norm_pre/bias', 'norm_pre.bias'),
    Rule('blocks_{i}/norm1/scale', 'blocks.{i}.norm1.weight'),
    Rule('blocks_{i}/norm1/bias', 'blocks.{i}.norm1.bias'),
    # [3D, D] -> [D, 3, H, hd]
    Rule('blocks_{i}/attn/qkv/kernel', 'blocks.{i}.attn.qkv.weight', LINEAR),
    Rule('blocks_{i}/attn/qkv/bias', 'blocks.{i}.attn.qkv.bias', VECTOR),
    Rule('blocks_{i}/attn/proj/kernel', 'blocks.{i}.attn.proj.weight', linear(2)),  # -> [H, hd, D]
    Rule('blocks_{i}/attn/proj/bias', 'blocks.{i}.attn.proj.bias'),
    Rule('blocks_{i}/ls1/gamma', 'blocks.{i}.ls1.gamma'),
    Rule('blocks_{i}/norm2/scale', 'blocks.{i}.norm2.weight'),
    Rule('blocks_{i}/norm2/bias', 'blocks.{i}.norm2.bias'),
    Rule('blocks_{i}/mlp/fc1/kernel', 'blocks.{i}.mlp.fc1.weight', LINEAR),
    Rule('blocks_{i}/mlp/fc1/bias', 'blocks.{i}.mlp.fc1.bias'),
    Rule('blocks_{i}/mlp/fc2/kernel', 'blocks.{i}.mlp.fc2.weight', LINEAR),
    Rule('blocks_{i}/mlp/fc2/bias', 'blocks.{i}.mlp.fc2.bias'),
    Rule('blocks_{i}/mlp/w12/kernel', 'blocks.{i}.mlp.w12.weight', LINEAR),  # [2M, D] -> [D, 2, M]
    Rule('blocks_{i}/mlp/w12/bias', 'blocks.{i}.mlp.w12.bias', VECTOR),
    Rule('blocks_{i}/mlp/w3/kernel', 'blocks.{i}.mlp.w3.weight', LINEAR),
    Rule('blocks_{i}/mlp/w3/bias', 'blocks.{i}.mlp.w3.bias'),
    Rule('blocks_{i}/ls2/gamma', 'blocks.{i}.ls2.gamma'),
    Rule('norm/scale', 'norm.weight'),
    Rule('norm/bias', 'norm.bias'),
))
_ANCHOR = 'patch_embed.proj.weight'
_CHUNKED = re.compile(r'^blocks\.\d+\.(\d+)\.')


def ours_to_hub(ours: dict) -> dict:
  hub = {}
  for name, x in ours.items():
    hub_name, rule = TABLE.theirs_name(name)
    if rule is None:
      raise ConversionError(f'parameter {name} has no DINOv2 equivalent')
    hub[hub_name] = rule.layout.from_ours(x)
  return hub


def with_patch_bias(hub: dict) -> dict:
  """``hub`` with a zero ``patch_embed.proj.bias`` when it has none (same function)."""
  if 'patch_embed.proj.bias' in hub:
    return hub
  weight = hub['patch_embed.proj.weight']
  return {**hub, 'patch_embed.proj.bias': layout.zeros(weight.shape[:1], weight)}


def refuse_unless(model, fmt: str, *, norm_pre: bool = False, quick_gelu: bool = False) -> None:
  """``ConversionError`` when ``fmt`` cannot express the model's pre-norm or QuickGELU."""
  if model.norm_pre and not norm_pre:
    raise ConversionError(f'{fmt} models have no norm_pre (LayerNorm before the blocks); this '
                          'model has one (an OpenCLIP-style tower): export it to timm or vitreg')
  if model.act != 'gelu' and not quick_gelu:
    raise ConversionError(f'{fmt} models use exact GELU; this model uses act={model.act!r}: '
                          'export it to timm, hf or vitreg')


def hub_to_ours(hub: dict, expected: dict) -> dict:
  """Our params, shaped like ``expected`` (``{name: ShapeDtypeStruct}``)."""
  out = {}
  for name, spec in expected.items():
    hub_name, rule = TABLE.theirs_name(name)
    out[name] = rule.layout.to_ours(hub[hub_name], spec.shape)
  return out


def unwrap(tensors: dict) -> dict:
  """The backbone of a hub state dict or a training checkpoint, with hub names."""
  prefixes = sorted({k[:-len(_ANCHOR)] for k in tensors if k.endswith(_ANCHOR)},
                    key=lambda p: ('teacher' not in p, len(p)))
  if not prefixes or not prefixes[0]:
    backbone = tensors
  else:
    prefix = prefixes[0]
    backbone = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    dropped = sorted({'.'.join(k.split('.')[:2]) for k in tensors if not k.startswith(prefix)})
    logger.info('using the backbone under %r; dropped the rest (%s)', prefix, ', '.join(dropped))
  if any(_CHUNKED.match(k) for k in backbone):
    backbone = {_CHUNKED.sub(r'blocks.\1.', k): v for k, v in backbone.items()}
  return backbone


def read(path: str):
  return unwrap(tensor_files.read_tensors(path)), {}


def hub_shapes(tensors: dict) -> dict:
  return {k: tuple(v.shape) for k, v in tensors.items()}


def convention(num_registers: int) -> dict:
  """The hub models' position-embedding resampling (REFERENCE §1.10)."""
  return {'interpolate_antialias': num_registers > 0,
          'interpolate_offset': 0.0 if num_registers else 0.1}


def from_ours(ours: dict, model, like=None) -> dict:
  del like
  refuse_unless(model, 'DINOv2 hub')
  return with_patch_bias(ours_to_hub(ours))


def to_ours(tensors: dict, expected: dict) -> dict:
  return hub_to_ours(tensors, expected)


def write(tensors: dict, model, path: str) -> None:
  """A hub-style state dict: ``.pth`` (torch) or ``.safetensors``, by suffix."""
  del model
  with tensor_files.atomic_file(path) as tmp:
    tensor_files.write_tensors(tensors, tmp)
