"""The architecture of a checkpoint: carried by its config, named, or read off its shapes.

Shapes give the width, depth, patch size, registers, FFN type and width,
LayerScale, pre-norm and patch-bias presence and the position-embedding grid;
they do not give the number of heads, which comes from the standard variant
table for the usual widths (``VARIANTS`` in ``models/vit.py``) unless a name
or override says, nor the activation or LayerNorm eps.
"""

import argparse
import ast
import math
import re

from vitreg_jax.convert.checks import ConversionError
from vitreg_jax.models import layers
from vitreg_jax.models.vit import VARIANTS, arch_kwargs

# The fields that define weights and features (runtime fields such as dtype,
# scan_blocks, remat_policy, attention_impl, drop_path_rate are not stored).
ARCH_FIELDS = (
    'patch_size', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio', 'ffn', 'num_registers',
    'class_token', 'layerscale_init', 'img_size', 'interpolate_antialias', 'interpolate_offset',
    'norm_eps', 'norm_pre', 'patch_bias', 'act')
# What an arch name such as 'vitl14_reg' fixes.
NAMED_FIELDS = ('patch_size', 'embed_dim', 'depth', 'num_heads', 'ffn', 'num_registers',
                'mlp_ratio')
HEADS_BY_WIDTH = {dim: heads for dim, _, heads, _ in VARIANTS.values()}
_BLOCK = re.compile(r'^blocks\.(\d+)\.')


def mlp_ratio_for(dim: int, hidden: int, ffn: str) -> float:
  """A ratio that reproduces ``hidden`` with the model's own width formula."""
  if ffn == 'swiglu':
    width = layers.swiglu_hidden_dim
    candidates = [4.0] + [1.5 * (t + 0.25) / dim for t in range(hidden - 7, hidden + 1)]
  else:
    width = lambda d, r: int(d * r)  # noqa: E731  (VisionTransformer.mlp_hidden_dim)
    candidates = [4.0, hidden / dim, (hidden + 0.25) / dim]
  for ratio in candidates:
    if width(dim, ratio) == hidden:
      return ratio
  raise ConversionError(f'no mlp_ratio gives a {ffn} hidden width of {hidden} for embed_dim {dim}')


def infer_from_hub_shapes(shapes: dict) -> tuple[dict, int | None]:
  """Model kwargs readable from DINOv2-hub-layout shapes, and the pos-embed grid side.

  Fields that cannot be read (heads for a non-standard width, anything whose
  key is missing) are left out.
  """
  kw = {'class_token': 'cls_token' in shapes,
        'num_registers': shapes['register_tokens'][1] if 'register_tokens' in shapes else 0}
  grid = None
  if 'patch_embed.proj.weight' in shapes:
    dim, chans, ph, pw = shapes['patch_embed.proj.weight']
    if ph != pw or chans != 3:
      raise ConversionError(
          f'patch_embed.proj.weight has shape {(dim, chans, ph, pw)}; only square patches on '
          '3-channel images are supported')
    kw.update(embed_dim=dim, patch_size=ph, patch_bias='patch_embed.proj.bias' in shapes)
    if dim in HEADS_BY_WIDTH:
      kw['num_heads'] = HEADS_BY_WIDTH[dim]
  blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))}
  if blocks:
    kw['depth'] = max(blocks) + 1
  if 'pos_embed' in shapes:
    n = shapes['pos_embed'][1] - int(kw['class_token'])
    grid = math.isqrt(n)
    if grid * grid != n:
      raise ConversionError(f'pos_embed {shapes["pos_embed"]} does not hold a square patch grid')
  dim = kw.get('embed_dim')
  if dim and 'blocks.0.mlp.w12.weight' in shapes:
    kw['ffn'] = 'swiglu'
    kw['mlp_ratio'] = mlp_ratio_for(dim, shapes['blocks.0.mlp.w12.weight'][0] // 2, 'swiglu')
  elif dim and 'blocks.0.mlp.fc1.weight' in shapes:
    kw['ffn'] = 'mlp'
    kw['mlp_ratio'] = mlp_ratio_for(dim, shapes['blocks.0.mlp.fc1.weight'][0], 'mlp')
  if blocks:
    kw['layerscale_init'] = 1e-5 if 'blocks.0.ls1.gamma' in shapes else None
    kw['norm_pre'] = 'norm_pre.weight' in shapes
  return kw, grid


def named(name: str) -> dict:
  try:
    kw = arch_kwargs(name)
  except ValueError as e:
    raise ConversionError(str(e)) from None
  kw['mlp_ratio'] = 4.0  # every named variant (the SwiGLU width formula starts from 4x too)
  return {k: kw[k] for k in NAMED_FIELDS}


def describe(kw: dict) -> str:
  """``'vits14_reg (embed_dim=384, ...)'``: the standard name when there is one."""
  name = 'custom'
  key = tuple(kw.get(k) for k in ('embed_dim', 'depth', 'num_heads', 'ffn', 'mlp_ratio'))
  for variant, (dim, depth, heads, ffn) in VARIANTS.items():
    if key == (dim, depth, heads, ffn, 4.0):
      r = kw.get('num_registers', 0)
      suffix = '' if not r else '_reg' if r == 4 else f'_reg{r}'
      name = f'vit{variant}{kw.get("patch_size")}{suffix}'
  fields = ', '.join(f'{k}={kw[k]!r}' for k in ARCH_FIELDS if k in kw)
  return f'{name} ({fields})'


def resolve(inferred: dict, grid: int | None, carried: dict, arch: str | None,
            convention, overrides: dict) -> dict:
  """Model kwargs from, in increasing priority: shapes, an arch name, the
  checkpoint's own config, the format's interpolation ``convention(num_registers)``,
  overrides."""
  kw = dict(inferred)
  if arch:
    kw.update(named(arch))
  kw.update(carried)
  if 'img_size' not in carried:
    patch = kw.get('patch_size', 14)
    kw['img_size'] = grid * patch if grid else (518 if patch == 14 else 224)
  kw.update({k: v for k, v in convention(kw.get('num_registers', 0)).items() if k not in carried})
  kw.update(overrides)
  missing = [k for k in ('patch_size', 'embed_dim', 'depth', 'num_heads') if k not in kw]
  if missing:
    if 'embed_dim' in kw and missing == ['num_heads']:
      why = f'embed_dim {kw["embed_dim"]} is not a standard width {sorted(HEADS_BY_WIDTH)}'
    else:
      why = 'the checkpoint lacks the keys to read it from'
    raise ConversionError(
        f'cannot infer {", ".join(missing)} ({why}); name the architecture with --arch '
        f'(e.g. vits14_reg) or pass it as an override, e.g. num_heads=...')
  return kw


def parse_override(text: str):
  """``'KEY=VALUE'`` of a command line -> ``(key, value)``: a Python literal, else the string
  (a bare word such as ``ffn=swiglu``). Raises ``argparse.ArgumentTypeError`` otherwise."""
  key, sep, value = text.partition('=')
  if not sep or not key:
    raise argparse.ArgumentTypeError(f'{text!r}: expected KEY=VALUE, e.g. num_heads=8')
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value
