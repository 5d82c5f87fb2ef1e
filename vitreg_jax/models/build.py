"""Backbones from config: ``config.model`` = an arch name plus field overrides."""

from typing import Any, Mapping

import jax.numpy as jnp

from vitreg_jax.models.vit import VisionTransformer, get_arch

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def dtype_from_name(name: str):
  if name not in DTYPES:
    raise ValueError(f'dtype {name!r}; valid: {sorted(DTYPES)}')
  return DTYPES[name]


def backbone_from_config(model_config: Mapping[str, Any], **defaults) -> VisionTransformer:
  """``get_arch(arch, **overrides)`` with ``dtype`` given by name.

  ``defaults`` (a recipe's choices, e.g. ``img_size`` = its training crop) apply
  unless ``model_config`` sets the same field.
  """
  overrides = {**defaults, **dict(model_config)}
  if 'arch' not in overrides:
    raise ValueError("config.model needs 'arch', e.g. 'vits14_reg'")
  arch = overrides.pop('arch')
  if 'dtype' in overrides:
    overrides['dtype'] = dtype_from_name(overrides['dtype'])
  return get_arch(arch, **overrides)
