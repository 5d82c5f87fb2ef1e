"""Weight converters between vitreg_jax and DINOv2 hub, timm, HF and OpenCLIP checkpoints.

    from vitreg_jax import convert
    model, variables = convert.load('timm:vit_small_patch14_reg4_dinov2.safetensors')
    out = model.apply(variables, images)  # NHWC float32 normalised -> cls, registers, patches ...
    convert.save(model, variables, 'hf:exported_folder')

``FORMAT:PATH`` with FORMAT one of

* ``vitreg``: our folder (config.json + model.safetensors or model.msgpack), no torch needed;
* ``dinov2``: DINOv2 hub state dict (``.pth``/``.safetensors``), training checkpoints too;
* ``timm``: a timm ViT state dict file, or a folder with config.json (timm ``local-dir:``);
* ``hf``: an HF ``save_pretrained`` folder of ``Dinov2WithRegistersModel``/``Dinov2Model``;
* ``open_clip``: an OpenCLIP ``CLIP`` state dict, or a folder with ``open_clip_config.json``.

OpenCLIP checkpoints hold two towers. ``load`` returns the image tower (a
``VisionTransformer``, as every format), which then exports like any
backbone; ``load_clip``/``save_clip`` handle the two-tower ``models.clip.CLIP``::

    clip, variables = convert.load_clip('open_clip:ViT-B-16.pt', arch='ViT-B-16')
    convert.save_clip(clip, variables, 'open_clip:exported_folder')  # create_model('local-dir:...')

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
from vitreg_jax.convert import checks, dinov2, hf, open_clip, open_clip_config, params, timm, vitreg
from vitreg_jax.convert.checks import ConversionError
from vitreg_jax.models import test_time_registers
from vitreg_jax.models.clip import CLIP
from vitreg_jax.models.text import TextTransformer
from vitreg_jax.models.vit import VisionTransformer

__all__ = ['FORMATS', 'ConversionError', 'load', 'load_clip', 'save', 'save_clip', 'parse_spec']

FORMATS = {m.NAME: m for m in (vitreg, dinov2, timm, hf, open_clip)}
_PLANNED = ()
_MODEL_FIELDS = {f.name for f in dataclasses.fields(VisionTransformer)} - {'parent', 'name'}
_TEXT_FIELDS = {f.name for f in dataclasses.fields(TextTransformer)} - {'parent', 'name'}
# Runtime choices that load_clip's overrides also pass to the text tower.
_SHARED_RUNTIME = ('dtype', 'scan_blocks', 'remat_policy', 'attention_impl')
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


def load(spec: str, arch: str | None = None, tt_registers: str | dict | None = None,
         **overrides):
  """``(model, variables)`` from ``'FORMAT:PATH'``.

  ``tt_registers``: test-time registers for a model trained without them (a
  neuron-list JSON file, a shipped name such as ``'dinov2_vitl14'``, or its
  dict; see :mod:`vitreg_jax.models.test_time_registers`).

  ``arch`` (e.g. ``'vitl14_reg'``) names the architecture where the format does
  not carry one; otherwise it is inferred from the shapes. From ``open_clip``
  the image tower is returned and ``arch`` is an OpenCLIP config (see ``load_clip``).
  ``overrides`` are ``VisionTransformer`` fields, e.g. ``num_heads=8`` for a
  non-standard width, or runtime choices such as ``scan_blocks=True``,
  ``dtype=jnp.bfloat16``.
  """
  if tt_registers is not None:
    model, variables = load(spec, arch, **overrides)
    return test_time_registers.apply(model, tt_registers), variables
  fmt, path = parse_spec(spec)
  if fmt is open_clip:  # the image tower of the two
    clip, variables = load_clip(spec, arch, **overrides)
    return clip.visual, {'params': variables['params']['visual']}
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
  if fmt is open_clip:
    raise ConversionError('open_clip checkpoints hold two towers: write a models.clip.CLIP with '
                          'convert.save_clip')
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


def _describe_clip(model: CLIP) -> str:
  t = model.text
  return (f'CLIP(embed_dim={model.embed_dim}, pool={model.pool!r}, image: '
          f'{arch_lib.describe(_model_kwargs(model.visual))}, text: width={t.width}, '
          f'depth={t.depth}, num_heads={t.num_heads}, context_length={t.context_length}, '
          f'vocab_size={t.vocab_size}, act={t.act!r})')


def _clip_model(model_cfg: dict, tensors: dict, layout: str, overrides: dict,
                text_overrides: dict) -> CLIP:
  unknown = sorted(set(overrides) - _MODEL_FIELDS) + sorted(set(text_overrides) - _TEXT_FIELDS)
  if unknown:
    raise ConversionError(f'unknown model fields {unknown}; image tower: {sorted(_MODEL_FIELDS)}; '
                          f'text tower (text_overrides): {sorted(_TEXT_FIELDS)}')
  if layout == 'native':
    vision_kw = {**open_clip_config.native_vision_kwargs(model_cfg), **overrides}
  else:
    trunk = {k[len(open_clip.TRUNK):]: v for k, v in tensors.items()
             if k.startswith(open_clip.TRUNK)}
    if 'fc_norm.weight' in trunk:
      raise ConversionError('timm trunk with fc_norm (LayerNorm after pooling, e.g. '
                            'vit_*_reg4_gap_*) is not supported: our towers norm every token')
    inferred, grid = arch_lib.infer_from_hub_shapes(timm.hub_shapes(trunk))
    vision_kw = arch_lib.resolve(inferred, grid, open_clip_config.timm_trunk_kwargs(model_cfg),
                                 None, timm.convention, overrides)
  text_kw = open_clip_config.text_kwargs(model_cfg)
  text_kw.update({k: overrides[k] for k in _SHARED_RUNTIME if k in overrides})
  text_kw.update(text_overrides)
  return CLIP(VisionTransformer(**vision_kw), TextTransformer(**text_kw),
              **open_clip_config.clip_kwargs(model_cfg))


def load_clip(spec: str, arch: str | None = None, text_overrides: dict | None = None,
              **overrides):
  """``(CLIP model, variables)`` from ``'open_clip:PATH'``, both towers.

  The architecture comes from the folder's ``open_clip_config.json``, else
  ``arch`` (an OpenCLIP model name such as ``'ViT-B-16-quickgelu'`` or a JSON
  file), else the shapes (GELU, heads = width / 64). ``overrides`` are
  ``VisionTransformer`` fields of the image tower; the runtime ones (``dtype``,
  ``scan_blocks``, ``remat_policy``, ``attention_impl``) also apply to the
  text tower, whose other fields go in ``text_overrides``.
  """
  fmt, path = parse_spec(spec)
  if fmt is not open_clip:
    raise ConversionError(f'{spec}: two-tower models are read from open_clip:PATH only')
  tensors, carried = open_clip.read(path)
  if carried and arch:
    logger.warning('%s carries its own config; --arch %s is ignored', spec, arch)
  if carried:
    model_cfg, source = carried, 'its open_clip_config.json'
  elif arch:
    model_cfg, source = open_clip_config.named(arch), f'--arch {arch}'
  else:
    model_cfg, source = open_clip_config.infer(tensors), 'its shapes'
  model_cfg = open_clip_config.validate(model_cfg)
  layout = open_clip.image_layout(tensors)
  described = 'timm' if model_cfg['vision_cfg']['timm_model_name'] else 'native'
  if described != layout:
    raise ConversionError(f'{spec}: the config ({source}) describes a {described} image tower, '
                          f'the checkpoint holds a {layout} one')
  model = _clip_model(model_cfg, tensors, layout, overrides, dict(text_overrides or {}))
  logger.info('architecture of %s from %s: %s', spec, source, _describe_clip(model))
  expected = params.clip_expected_shapes(model)
  expected_theirs = jax.eval_shape(lambda p: open_clip.from_ours(p, model, layout, tensors),
                                   expected)
  checks.check_tensors(tensors, expected_theirs,
                       f'{spec} does not match the architecture {_describe_clip(model)}')
  ours = {k: np.asarray(v, np.float32)
          for k, v in open_clip.to_ours(tensors, expected, layout).items()}
  return model, params.clip_to_variables(ours, model)


def save_clip(model: CLIP, variables, spec: str, **options) -> None:
  """Writes a two-tower model as ``'open_clip:PATH'`` (a folder, or a state dict file).

  ``options``: ``layout='native'|'timm'`` (default: native when the image
  tower has that form, i.e. no registers, no patch bias, one activation for
  both towers; else the timm trunk), ``preprocess={...}`` (entries of the
  folder's ``preprocess_cfg``; default OpenAI mean/std, bicubic, model size).
  """
  fmt, path = parse_spec(spec)
  if fmt is not open_clip:
    raise ConversionError(f'{spec}: two-tower models are written to open_clip:PATH only')
  unknown = sorted(set(options) - set(open_clip.WRITE_OPTIONS))
  if unknown:
    raise ConversionError(f'open_clip takes no write options {unknown}; valid: '
                          f'{list(open_clip.WRITE_OPTIONS)}')
  ours = params.clip_canonical(variables)
  checks.check_tensors(ours, params.clip_expected_shapes(model),
                       f'params do not match the model {_describe_clip(model)}')
  layout = options.get('layout') or open_clip.default_layout(model)
  tensors = open_clip.from_ours(ours, model, layout)
  open_clip.write(tensors, model, path, layout, options.get('preprocess'))
  logger.info('wrote %s (%s image tower)', spec, layout)
