"""Backbones from config: ``config.model`` = an arch name plus field overrides."""

from typing import Any, Mapping

import jax.numpy as jnp

from vitreg_jax.models.vit import VisionTransformer, get_arch

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def dtype_from_name(name: str):
  if name not in DTYPES:
    raise ValueError(f'dtype {name!r}; valid: {sorted(DTYPES)}')
  return DTYPES[name]


def arch_with_registers(arch: str, num_registers: int | None) -> str:
  """``vitl16`` + 4 -> ``vitl16_reg4``: the register count comes from ``model.num_registers``.

  An arch name that carries its own ``_regN`` must agree with it (a config
  has one source for the register count).
  """
  if num_registers is None:
    return arch
  base, _, suffix = arch.partition('_reg')
  if _:
    named = int(suffix or 4)
    if named != num_registers:
      raise ValueError(f'model.arch={arch!r} says {named} registers but model.num_registers='
                       f'{num_registers}; drop the _reg suffix and set model.num_registers')
  return f'{base}_reg{num_registers}' if num_registers else base


def backbone_from_config(model_config: Mapping[str, Any], **defaults) -> VisionTransformer:
  """``get_arch(arch, **overrides)`` with ``dtype`` given by name.

  ``defaults`` (a recipe's choices, e.g. ``img_size`` = its training crop) apply
  unless ``model_config`` sets the same field. ``num_registers`` picks the
  arch's register variant (which also decides DINOv2's position-embedding
  resampling: antialiased for register models, the legacy path otherwise).
  """
  overrides = {**defaults, **dict(model_config)}
  if 'arch' not in overrides:
    raise ValueError("config.model needs 'arch', e.g. 'vits14'")
  registers = overrides.pop('num_registers', None)
  arch = arch_with_registers(overrides.pop('arch'), registers)
  if 'dtype' in overrides:
    overrides['dtype'] = dtype_from_name(overrides['dtype'])
  return get_arch(arch, **overrides)
