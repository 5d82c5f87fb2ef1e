"""Weight converters between vitreg_jax and DINOv2 hub, timm and HF checkpoints.

    from vitreg_jax import convert
    model, variables = convert.load('timm:vit_small_patch14_reg4_dinov2.safetensors')
    out = model.apply(variables, images)  # NHWC float32 normalised -> cls, registers, patches ...
    convert.save(model, variables, 'hf:exported_folder')

``FORMAT:PATH`` with FORMAT one of

* ``vitreg``: our folder (config.json + model.safetensors or model.msgpack), no torch needed;
* ``dinov2``: DINOv2 hub state dict (``.pth``/``.safetensors``), training checkpoints too;
* ``timm``: a timm ViT state dict file, or a folder with config.json (timm ``local-dir:``);
* ``hf``: an HF ``save_pretrained`` folder of ``Dinov2WithRegistersModel``/``Dinov2Model``.

Each format module is a name/layout map between our flat params and the
format's flat tensors (``from_ours``/``to_ours``), with ``read``/``write`` and
the format's position-embedding resampling convention. Before converting, the
checkpoint is checked key by key against the shapes the architecture implies,
in the checkpoint's own names. Imported params are plain numpy float32 arrays
(not the ``LogicallyPartitioned`` boxes ``model.init`` returns); ``save``
accepts either, scanned or not.
"""

import dataclasses
import logging

import jax
import numpy as np

from vitreg_jax.convert import arch as arch_lib
from vitreg_jax.convert import checks, dinov2, hf, params, timm, vitreg
from vitreg_jax.convert.checks import ConversionError
from vitreg_jax.models.vit import VisionTransformer

__all__ = ['FORMATS', 'ConversionError', 'load', 'save', 'parse_spec']

FORMATS = {m.NAME: m for m in (vitreg, dinov2, timm, hf)}
_PLANNED = ('open_clip',)
_MODEL_FIELDS = {f.name for f in dataclasses.fields(VisionTransformer)} - {'parent', 'name'}
logger = logging.getLogger('vitreg_jax.convert')


def parse_spec(spec: str):
  """``'FORMAT:PATH'`` -> (format module, path)."""
  fmt, sep, path = spec.partition(':')
  if fmt in _PLANNED:
    raise ConversionError(f'{fmt!r} is not supported yet; valid formats: {sorted(FORMATS)}')
  if not sep or fmt not in FORMATS or not path:
    raise ConversionError(f'{spec!r}: expected FORMAT:PATH with FORMAT one of {sorted(FORMATS)}')
  return FORMATS[fmt], path


def _model_kwargs(model) -> dict:
  return {k: getattr(model, k) for k in arch_lib.ARCH_FIELDS}


def _architecture(fmt, tensors, carried, arch, overrides, spec) -> tuple[dict, dict]:
  """Model kwargs for a checkpoint, and what its shapes alone suggest."""
  unknown = sorted(set(overrides) - _MODEL_FIELDS)
  if unknown:
    raise ConversionError(f'unknown model fields {unknown}; valid: {sorted(_MODEL_FIELDS)}')
  try:
    inferred, grid = arch_lib.infer_from_hub_shapes(fmt.hub_shapes(tensors))
  except (KeyError, ValueError, TypeError) as e:  # ConversionError is a ValueError
    if not (arch or carried):
      raise ConversionError(
          f'cannot infer the architecture of {spec}: {e}; name it with --arch') from None
    inferred, grid = {}, None
  if carried and arch:
    logger.warning('%s carries its own architecture; --arch %s is ignored', spec, arch)
    arch = None
  kw = arch_lib.resolve(inferred, grid, carried, arch, fmt.convention, overrides)
  source = ('its config' if carried else f'--arch {arch}' if arch
            else 'its shapes (num_heads from the standard width table)')
  logger.info('architecture of %s from %s: %s', spec, source, arch_lib.describe(kw))
  suggested = dict(inferred)
  if grid:
    suggested['img_size'] = grid * inferred.get('patch_size', kw['patch_size'])
  return kw, suggested


def load(spec: str, arch: str | None = None, **overrides):
  """``(model, variables)`` from ``'FORMAT:PATH'``.

  ``arch`` (e.g. ``'vitl14_reg'``) names the architecture where the format does
  not carry one; otherwise it is inferred from the shapes. ``overrides`` are
  ``VisionTransformer`` fields, e.g. ``num_heads=8`` for a non-standard width,
  or runtime choices such as ``scan_blocks=True``, ``dtype=jnp.bfloat16``.
  """
  fmt, path = parse_spec(spec)
  tensors, carried = fmt.read(path)
  kw, suggested = _architecture(fmt, tensors, carried, arch, overrides, spec)
  model = VisionTransformer(**kw)
  expected = params.expected_shapes(model)
  expected_theirs = jax.eval_shape(lambda p: fmt.from_ours(p, model, tensors), expected)
  hint = ''
  if arch and any(suggested.get(k, kw[k]) != kw[k] for k in arch_lib.NAMED_FIELDS + ('img_size',)):
    hint = f'  its shapes suggest: {arch_lib.describe(suggested)}'
  checks.check_tensors(
      tensors, expected_theirs,
      f'{spec} does not match the architecture {arch_lib.describe(kw)}', hint)
  ours = {k: np.asarray(v, np.float32) for k, v in fmt.to_ours(tensors, expected).items()}
  return model, params.to_variables(ours, model.scan_blocks)


def save(model: VisionTransformer, variables, spec: str, **options) -> None:
  """Writes ``variables`` (``{'params': ...}``, boxed or not, scanned or not) as ``'FORMAT:PATH'``.

  ``options`` (the format module's ``WRITE_OPTIONS``): ``weights='msgpack'`` for
  ``vitreg``; for ``timm``, ``layout='deit3'`` (timm's ``deit3_*`` token layout,
  ``no_embed_class=True`` with or without registers), ``head=head_params`` (a
  classifier ``Dense``'s ``{'kernel': [D, C], 'bias': [C]}``, written as
  ``head.weight``/``head.bias``) and ``pool='cls'|'mean'`` (see ``convert.timm``)::

      save(model, variables, 'timm:deit3.safetensors', layout='deit3',
           head=classifier_variables['params']['head'])

  Nothing is written unless the whole conversion succeeds.
  """
  fmt, path = parse_spec(spec)
  unknown = sorted(set(options) - set(getattr(fmt, 'WRITE_OPTIONS', ())))
  if unknown:
    raise ConversionError(f'{fmt.NAME} takes no write options {unknown}')
  ours = params.canonical(variables)
  checks.check_tensors(ours, params.expected_shapes(model),
                       f'params do not match the model {arch_lib.describe(_model_kwargs(model))}')
  # Options that change the tensors (e.g. timm's layout, head) also go to from_ours.
  converting = {k: v for k, v in options.items() if k in getattr(fmt, 'CONVERT_OPTIONS', ())}
  fmt.write(fmt.from_ours(ours, model, **converting), model, path, **options)
  logger.info('wrote %s', spec)
