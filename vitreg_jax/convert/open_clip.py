"""OpenCLIP checkpoints (``open_clip.CLIP`` state dicts, REFERENCE §9): both towers.

Two layouts of the image tower, one of the text tower:

* ``native``: OpenCLIP's own ViT (``visual.conv1``, ``visual.class_embedding``,
  ``visual.positional_embedding [1+N, D]``, ``visual.ln_pre``,
  ``visual.transformer.resblocks.{i}.{ln_1, attn.in_proj_*, attn.out_proj,
  ln_2, mlp.c_fc, mlp.c_proj, ls_1/ls_2.gamma}``, ``visual.ln_post``,
  ``visual.proj [D, E]``). No registers, no patch bias: our
  ``norm_pre=True, patch_bias=False`` (``models.vit``).
* ``timm``: a timm trunk (``visual.trunk.*`` in timm's layout, through
  ``convert.timm``; exported with ``no_embed_class=True``, so registers get no
  position) and ``visual.head.proj.weight [E, D]``. This is the route with
  registers.
* text (top level): ``token_embedding.weight``, ``positional_embedding``,
  ``transformer.resblocks.{i}.*`` (as the image blocks), ``ln_final``,
  ``text_projection [W, E]``; ``logit_scale []``, ``logit_bias []`` (SigLIP).

Our ``mask_token`` has no OpenCLIP equivalent (zeros on import). Reads
accept training checkpoints (``state_dict.``/``module.`` prefixes) and
``CustomTextCLIP``'s ``text.`` prefix for the native text tower. A folder
export holds ``open_clip_config.json`` (``{"model_cfg", "preprocess_cfg"}``)
and ``open_clip_model.safetensors``: ``open_clip.create_model('local-dir:PATH')``
(see ``open_clip_config`` for OpenCLIP versions and ``timm_model_kwargs``).
"""

import logging
import os

import numpy as np

from vitreg_jax.convert import open_clip_config, tensor_files, timm
from vitreg_jax.convert.checks import ConversionError
from vitreg_jax.convert.layout import CONV, LINEAR, SAME, VECTOR, Layout, Rule, Table, linear

NAME = 'open_clip'
LAYOUTS = ('native', 'timm')
WRITE_OPTIONS = ('layout', 'preprocess')
CONFIG_FILE = 'open_clip_config.json'
WEIGHTS_FILE = 'open_clip_model.safetensors'
# OpenCLIP's preference when a folder holds several (factory._find_checkpoint_in_dir).
_WEIGHT_FILES = (WEIGHTS_FILE, 'open_clip_pytorch_model.safetensors', 'open_clip_pytorch_model.bin',
                 'open_clip_pytorch_model.pth', 'model.safetensors', 'pytorch_model.bin',
                 'pytorch_model.pth', 'model.pth')
TRUNK = 'visual.trunk.'
_ANCHOR = 'logit_scale'
_TEXT_PREFIX = 'text.'  # CustomTextCLIP
logger = logging.getLogger('vitreg_jax.convert')

# A leading unit axis of ours that OpenCLIP drops: pos_embed [1, T, D] <-> [T, D].
LEADING = Layout('leading', lambda x, shape: x.reshape(shape), lambda x: x.reshape(x.shape[1:]))


def _block_rules(ours: str, theirs: str) -> tuple[Rule, ...]:
  """One pre-LN block: ``ours`` e.g. ``visual/blocks_{i}/``, ``theirs`` ``...resblocks.{i}.``."""
  rows = [('norm1/scale', 'ln_1.weight', SAME), ('norm1/bias', 'ln_1.bias', SAME),
          ('attn/qkv/kernel', 'attn.in_proj_weight', LINEAR),  # [3D, D] -> [D, 3, H, hd]
          ('attn/qkv/bias', 'attn.in_proj_bias', VECTOR),
          ('attn/proj/kernel', 'attn.out_proj.weight', linear(2)),  # -> [H, hd, D]
          ('attn/proj/bias', 'attn.out_proj.bias', SAME),
          ('ls1/gamma', 'ls_1.gamma', SAME),
          ('norm2/scale', 'ln_2.weight', SAME), ('norm2/bias', 'ln_2.bias', SAME),
          ('mlp/fc1/kernel', 'mlp.c_fc.weight', LINEAR), ('mlp/fc1/bias', 'mlp.c_fc.bias', SAME),
          ('mlp/fc2/kernel', 'mlp.c_proj.weight', LINEAR),
          ('mlp/fc2/bias', 'mlp.c_proj.bias', SAME),
          ('ls2/gamma', 'ls_2.gamma', SAME)]
  return tuple(Rule(ours + a, theirs + b, lay) for a, b, lay in rows)


NATIVE_VISION = Table((
    Rule('visual/cls_token', 'visual.class_embedding', VECTOR),  # [1, 1, D] <-> [D]
    Rule('visual/pos_embed', 'visual.positional_embedding', LEADING),
    Rule('visual/patch_embed/proj/kernel', 'visual.conv1.weight', CONV),
    Rule('visual/norm_pre/scale', 'visual.ln_pre.weight'),
    Rule('visual/norm_pre/bias', 'visual.ln_pre.bias'),
    *_block_rules('visual/blocks_{i}/', 'visual.transformer.resblocks.{i}.'),
    Rule('visual/norm/scale', 'visual.ln_post.weight'),
    Rule('visual/norm/bias', 'visual.ln_post.bias'),
    Rule('image_projection', 'visual.proj'),  # [D, E] on both sides
))
TIMM_HEAD = Table((Rule('image_projection', 'visual.head.proj.weight', LINEAR),))  # [E, D]
TEXT = Table((
    Rule('text/token_embedding/embedding', 'token_embedding.weight'),
    Rule('text/positional_embedding', 'positional_embedding'),
    *_block_rules('text/blocks_{i}/', 'transformer.resblocks.{i}.'),
    Rule('text/ln_final/scale', 'ln_final.weight'),
    Rule('text/ln_final/bias', 'ln_final.bias'),
    Rule('text/text_projection', 'text_projection'),
    Rule('logit_scale', 'logit_scale'),  # [] ([1] with nonscalar_logit_scale: reshaped)
    Rule('logit_bias', 'logit_bias'),
))


def image_layout(tensors: dict) -> str:
  """``'native'`` or ``'timm'`` from the keys of a (unwrapped) state dict."""
  if 'visual.conv1.weight' in tensors:
    return 'native'
  if TRUNK + 'patch_embed.proj.weight' in tensors:
    return 'timm'
  visual = sorted({'.'.join(k.split('.')[:2]) for k in tensors if k.startswith('visual.')})
  raise ConversionError(
      f'not an OpenCLIP ViT image tower (no visual.conv1.weight nor '
      f'{TRUNK}patch_embed.proj.weight); visual keys: {visual[:8]}')


def native_problems(model) -> list[str]:
  """Why the image tower has no native OpenCLIP form (empty when it has one)."""
  v = model.visual
  checks = [(v.num_registers, 'registers (the native ViT has none)'),
            (not v.class_token, 'no class token'),
            (v.patch_bias, 'a patch-embedding bias'),
            (v.ffn != 'mlp', f'ffn={v.ffn!r}'),
            (v.act != model.text.act, f'act={v.act!r} but the text tower {model.text.act!r}')]
  return [why for bad, why in checks if bad]


def default_layout(model) -> str:
  return 'timm' if native_problems(model) else 'native'


def _map(table: Table, flat: dict) -> dict:
  out = {}
  for name, x in flat.items():
    theirs, rule = table.theirs_name(name)
    if rule is None:
      raise ConversionError(f'parameter {name} has no OpenCLIP equivalent')
    out[theirs] = rule.layout.from_ours(x)
  return out


def _split(ours: dict) -> tuple[dict, dict]:
  """(image tower params without the ``visual/`` prefix, everything else)."""
  visual = {k[len('visual/'):]: v for k, v in ours.items() if k.startswith('visual/')}
  return visual, {k: v for k, v in ours.items() if not k.startswith('visual/')}


def _trunk(tensors: dict) -> dict:
  return {k[len(TRUNK):]: v for k, v in tensors.items() if k.startswith(TRUNK)}


def from_ours(ours: dict, model, layout: str, like: dict | None = None) -> dict:
  """OpenCLIP tensors from our flat CLIP params (``params.clip_canonical``).

  ``like``: an OpenCLIP state dict whose timm trunk layout to follow.
  """
  if layout not in LAYOUTS:
    raise ConversionError(f'open_clip layout={layout!r}; valid: {LAYOUTS}')
  visual, rest = _split(ours)
  visual.pop('mask_token', None)
  projection = {'image_projection': rest.pop('image_projection')}
  if layout == 'native':
    problems = native_problems(model)
    if problems:
      raise ConversionError(f'the native OpenCLIP ViT cannot hold this image tower: it has '
                            f'{", ".join(problems)}; use layout=\'timm\'')
    out = _map(NATIVE_VISION, {f'visual/{k}': v for k, v in visual.items()})
    out.update(_map(NATIVE_VISION, projection))
  else:
    trunk_like = _trunk(like) if like else None
    trunk = timm.from_ours(visual, model.visual, like=trunk_like, layout='deit3')
    out = {TRUNK + k: v for k, v in trunk.items()}
    out.update(_map(TIMM_HEAD, projection))
  out.update(_map(TEXT, rest))
  return out


def to_ours(tensors: dict, expected: dict, layout: str) -> dict:
  """Our flat CLIP params shaped like ``expected`` (``params.clip_expected_shapes``)."""
  visual_expected, rest = _split(expected)
  out = {}
  if layout == 'timm':
    trunk = timm.to_ours(_trunk(tensors), visual_expected)
    out.update({f'visual/{k}': v for k, v in trunk.items()})
    tables = (TIMM_HEAD, TEXT)
  else:
    tables = (NATIVE_VISION, TEXT)
    rest = {**rest, **{f'visual/{k}': v for k, v in visual_expected.items()}}
  for name, spec in rest.items():
    if name == 'visual/mask_token':
      out[name] = np.zeros(spec.shape, np.float32)
      continue
    for table in tables:
      theirs, rule = table.theirs_name(name)
      if rule is not None:
        out[name] = rule.layout.to_ours(tensors[theirs], spec.shape)
        break
    else:
      raise ConversionError(f'parameter {name} has no OpenCLIP equivalent')
  return out


def unwrap(tensors: dict) -> dict:
  """The model's tensors of a state dict or training checkpoint, with ``CLIP`` names."""
  prefixes = sorted({k[:-len(_ANCHOR)] for k in tensors if k.endswith(_ANCHOR)
                     and (not k[:-len(_ANCHOR)] or k[:-len(_ANCHOR)].endswith('.'))}, key=len)
  if prefixes and prefixes[0]:
    prefix = prefixes[0]
    logger.info('using the model under %r', prefix)
    tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  out = {}
  for name, x in tensors.items():
    if name.startswith(_TEXT_PREFIX):  # CustomTextCLIP with OpenCLIP's own text tower
      name = name[len(_TEXT_PREFIX):]
    if name in ('logit_scale', 'logit_bias'):
      x = x.reshape(())
    out[name] = x
  return out


def _weights_in(folder: str) -> str:
  for name in _WEIGHT_FILES:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise ConversionError(f'{folder}: no OpenCLIP weights ({", ".join(_WEIGHT_FILES[:3])} ...)')


def read(path: str):
  """``(tensors, model_cfg or None)``: a state dict file, or a folder with its config."""
  model_cfg = None
  if os.path.isdir(path):
    config_path = os.path.join(path, CONFIG_FILE)
    if os.path.isfile(config_path):
      config = tensor_files.read_json(config_path)
      if 'model_cfg' not in config:
        raise ConversionError(f'{config_path}: no "model_cfg"')
      model_cfg = config['model_cfg']
    path = _weights_in(path)
  return unwrap(tensor_files.read_tensors(path)), model_cfg


def trunk_config(model, tensors: dict) -> dict:
  """``timm_model_kwargs`` that make ``TIMM_ENTRY`` build our trunk (as ``convert.timm``'s)."""
  if model.visual.ffn != 'mlp':
    raise ConversionError('a SwiGLU image tower cannot be named in an OpenCLIP timm config')
  args = timm.model_config(model.visual, _trunk(tensors), layout='deit3',
                           pool=model.pool)['model_args']
  args.pop('num_classes')
  if args.get('init_values') is None:
    args.pop('init_values', None)
  if model.visual.class_token:  # OpenCLIP sets the pool (timm_pool); timm needs one only
    args.pop('global_pool', None)  # when its default 'token' has no class token to read
  args['fc_norm'] = False  # the final norm before pooling, as ours, also for 'avg'
  return args


def write(tensors: dict, model, path: str, layout: str, preprocess: dict | None = None) -> None:
  """A state dict file (``.safetensors``/``.pth``...), or a folder ``create_model`` loads."""
  trunk_args = trunk_config(model, tensors) if layout == 'timm' else None
  config = {'model_cfg': open_clip_config.to_config(model, layout, trunk_args),
            'preprocess_cfg': open_clip_config.preprocess_config(model, preprocess)}
  if path.endswith(('.safetensors',) + tensor_files.TORCH_SUFFIXES):
    logger.info('a file export holds the weights only; export to a folder for its config')
    with tensor_files.atomic_file(path) as tmp:
      tensor_files.write_tensors(tensors, tmp)
    return
  with tensor_files.atomic_dir(path) as tmp:
    tensor_files.write_tensors(tensors, os.path.join(tmp, WEIGHTS_FILE))
    tensor_files.write_json(config, os.path.join(tmp, CONFIG_FILE))
