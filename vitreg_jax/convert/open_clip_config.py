"""OpenCLIP model configs (``ViT-B-16.json``'s schema) to and from our CLIP models.

A config is ``{"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"?,
"init_logit_scale"?, "init_logit_bias"?}`` (REFERENCE §9). It comes from the
checkpoint folder's ``open_clip_config.json`` (``{"model_cfg", "preprocess_cfg"}``),
from ``--arch`` (an OpenCLIP model name, read from the installed package's
``model_configs/`` without importing it, or a JSON file), or, for a bare state
dict, from the tensor shapes (native towers; heads = width / 64 as in every
OpenCLIP config).

Two image towers: OpenCLIP's native ViT (``visual.conv1`` ...: ``ln_pre``, no
patch bias, LayerNorm eps 1e-5, QuickGELU with ``quick_gelu``, no registers)
and a timm trunk (``vision_cfg.timm_model_name``; registers live here). The
timm trunk's architecture is read from its shapes plus ``timm_model_kwargs``;
only the fields we implement are accepted, anything else is refused by name.

``timm_model_kwargs`` is read by OpenCLIP after 3.3.0 (upstream main since
May 2026; checked with 4.2.0.dev0: ``create_model('local-dir:PATH')`` builds our
timm-tower exports and gives our embeddings). OpenCLIP <= 3.3.0 rejects the
key (``CLIPVisionCfg`` has no such field), so there a timm-tower export loads
only by building the trunk with those kwargs by hand (as the tests do); native
exports load by ``local-dir:`` in every version.
"""

import importlib.util
import logging
import os

from vitreg_jax.convert import arch as arch_lib
from vitreg_jax.convert import tensor_files
from vitreg_jax.convert.checks import ConversionError

logger = logging.getLogger('vitreg_jax.convert')

# OpenCLIP's dataclass defaults (open_clip/model.py CLIPVisionCfg, CLIPTextCfg).
VISION_DEFAULTS = dict(layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16,
                       image_size=224, ls_init_value=None, no_ln_pre=False, pool_type='tok',
                       timm_model_name=None, timm_pool='avg', timm_proj='linear',
                       timm_proj_bias=False, timm_model_kwargs=None, norm_kwargs=None)
TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12,
                     mlp_ratio=4.0, ls_init_value=None, no_causal_mask=False, norm_kwargs=None)
# Keys we read past: training-time or tokenizer settings that do not change the weights' function.
_IGNORED = {'patch_dropout', 'output_tokens', 'timm_model_pretrained', 'timm_drop',
            'timm_drop_path', 'hf_tokenizer_name', 'tokenizer_kwargs', 'tokenizer_mode', 'pad_id',
            'eos_id', 'attn_pooler_queries', 'attn_pooler_heads'}
# Keys we accept only at these values (features we do not implement).
_FIXED = {
    'vision_cfg': dict(attentional_pool=False, final_ln_after_pool=False,
                       pos_embed_type='learnable', act_kwargs=None, block_type=None,
                       qk_norm=False, scaled_cosine_attn=False, scale_heads=False,
                       scale_attn_inner=False, scale_attn=False, scale_fc=False),
    'text_cfg': dict(embed_cls=False, pool_type='argmax', proj_bias=False, proj_type='linear',
                     act_kwargs=None, block_type=None, qk_norm=False, scaled_cosine_attn=False,
                     scale_heads=False, scale_attn_inner=False, scale_attn=False, scale_fc=False,
                     hf_model_name=None, use_pad_mask=False),
}
_TOP = {'embed_dim', 'vision_cfg', 'text_cfg', 'quick_gelu', 'init_logit_scale',
        'init_logit_bias', 'custom_text', 'nonscalar_logit_scale'}
_POOLS = {'tok': 'cls', 'avg': 'mean'}  # native pool_type -> ours
_TIMM_POOLS = {'token': 'cls', 'avg': 'mean'}
OPENCLIP_EPS = 1e-5  # OpenCLIP's LayerNorm
TIMM_EPS = 1e-6
# What OpenCLIP names the architecture of our timm trunks: an entry point that sets no
# LayerScale (timm prunes init_values=None, so it could not switch a default one off);
# every field is in timm_model_kwargs.
TIMM_ENTRY = 'vit_base_patch16_224'
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_keys(cfg: dict, section: str, known: set) -> None:
  fixed = _FIXED.get(section, {})
  unknown = sorted(set(cfg) - known - set(fixed) - _IGNORED)
  if unknown:
    raise ConversionError(f'OpenCLIP {section}: unsupported keys {unknown}')
  bad = [f'{k}={cfg[k]!r} (only {v!r})' for k, v in fixed.items()
         if k in cfg and cfg[k] != v and not (v is None and cfg[k] in ('default', {}))]
  if bad:
    raise ConversionError(f'OpenCLIP {section}: unsupported settings {", ".join(bad)}')


def _eps(cfg: dict, default: float) -> float:
  kwargs = cfg.get('norm_kwargs') or {}
  unknown = sorted(set(kwargs) - {'eps'})
  if unknown:
    raise ConversionError(f'OpenCLIP norm_kwargs {unknown} are not supported (only eps)')
  return float(kwargs.get('eps', default))


def validate(model_cfg: dict) -> dict:
  """The config with OpenCLIP's defaults filled in; unsupported features refused by name."""
  required = {'embed_dim', 'vision_cfg', 'text_cfg'}
  if not isinstance(model_cfg, dict) or not required <= set(model_cfg):
    got = sorted(model_cfg) if isinstance(model_cfg, dict) else type(model_cfg).__name__
    raise ConversionError(f'not an OpenCLIP model config (needs embed_dim, vision_cfg, text_cfg): '
                          f'{got}')
  unknown = sorted(set(model_cfg) - _TOP)
  if unknown:
    raise ConversionError(f'OpenCLIP model config: unsupported keys {unknown} (CoCa and other '
                          'multimodal models are not supported)')
  vision, text = model_cfg['vision_cfg'], model_cfg['text_cfg']
  _check_keys(vision, 'vision_cfg', set(VISION_DEFAULTS))
  _check_keys(text, 'text_cfg', set(TEXT_DEFAULTS))
  if isinstance(vision.get('layers'), (list, tuple)):
    raise ConversionError('OpenCLIP ModifiedResNet image towers are not supported (ViTs only)')
  out = dict(model_cfg)
  out['vision_cfg'] = {**VISION_DEFAULTS, **vision}
  out['text_cfg'] = {**TEXT_DEFAULTS, **text}
  return out


def text_kwargs(model_cfg: dict) -> dict:
  """``TextTransformer`` fields of a validated config."""
  t = model_cfg['text_cfg']
  return dict(vocab_size=t['vocab_size'], context_length=t['context_length'], width=t['width'],
              depth=t['layers'], num_heads=t['heads'], mlp_ratio=float(t['mlp_ratio']),
              embed_dim=model_cfg['embed_dim'],
              act='quick_gelu' if model_cfg.get('quick_gelu') else 'gelu',
              norm_eps=_eps(t, OPENCLIP_EPS), layerscale_init=t['ls_init_value'],
              causal=not t['no_causal_mask'])


def clip_kwargs(model_cfg: dict) -> dict:
  """``CLIP`` fields (besides the towers) of a validated config."""
  v = model_cfg['vision_cfg']
  if v['timm_model_name']:
    if v['timm_pool'] not in _TIMM_POOLS:
      raise ConversionError(f"OpenCLIP timm_pool={v['timm_pool']!r} is not supported; "
                            f'valid: {sorted(_TIMM_POOLS)}')
    if v['timm_proj'] != 'linear' or v['timm_proj_bias']:
      raise ConversionError(f"OpenCLIP timm_proj={v['timm_proj']!r} timm_proj_bias="
                            f"{v['timm_proj_bias']!r}: only a bias-free 'linear' projection")
    pool = _TIMM_POOLS[v['timm_pool']]
  else:
    if v['pool_type'] not in _POOLS:
      raise ConversionError(f"OpenCLIP pool_type={v['pool_type']!r}; valid: {sorted(_POOLS)}")
    pool = _POOLS[v['pool_type']]
  out = dict(embed_dim=model_cfg['embed_dim'], pool=pool,
             init_logit_bias=model_cfg.get('init_logit_bias'))
  if 'init_logit_scale' in model_cfg:
    out['init_logit_scale'] = float(model_cfg['init_logit_scale'])
  return out


def native_vision_kwargs(model_cfg: dict) -> dict:
  """``VisionTransformer`` fields for OpenCLIP's own ViT (no registers)."""
  v = model_cfg['vision_cfg']
  width, head_width = v['width'], v['head_width']
  if width % head_width:
    raise ConversionError(f'OpenCLIP vision width {width} is not a multiple of head_width '
                          f'{head_width}')
  return dict(
      patch_size=v['patch_size'], embed_dim=width, depth=v['layers'],
      num_heads=width // head_width, mlp_ratio=float(v['mlp_ratio']), ffn='mlp',
      num_registers=0, class_token=True, layerscale_init=v['ls_init_value'],
      img_size=_square(v['image_size']), interpolate_antialias=True, interpolate_offset=0.0,
      norm_eps=_eps(v, OPENCLIP_EPS), norm_pre=not v['no_ln_pre'], patch_bias=False,
      act='quick_gelu' if model_cfg.get('quick_gelu') else 'gelu')


def timm_trunk_kwargs(model_cfg: dict) -> dict:
  """Our fields that a timm trunk's name and ``timm_model_kwargs`` fix (shapes give the rest)."""
  v = model_cfg['vision_cfg']
  name, kwargs = v['timm_model_name'], dict(v['timm_model_kwargs'] or {})
  if kwargs.get('fc_norm') or (kwargs.get('global_pool') == 'avg' and 'fc_norm' not in kwargs):
    raise ConversionError(f'timm trunk {name}: fc_norm (LayerNorm after pooling) is not supported')
  out = {}
  if 'num_heads' in kwargs:
    out['num_heads'] = int(kwargs['num_heads'])
  if 'img_size' in kwargs:
    out['img_size'] = _square(kwargs['img_size'])
  act = kwargs.get('act_layer', 'quick_gelu' if 'quickgelu' in name else 'gelu')
  if act not in ('gelu', 'quick_gelu'):
    raise ConversionError(f'timm trunk {name}: act_layer={act!r} is not supported')
  # timm's *_clip_* entry points build torch's LayerNorm (eps 1e-5); a JSON config cannot
  # name an eps, so everything else has timm's 1e-6.
  out.update(act=act, norm_eps=OPENCLIP_EPS if '_clip_' in name else TIMM_EPS)
  return out


def _square(size) -> int:
  if isinstance(size, (list, tuple)):
    if len(set(size)) != 1:
      raise ConversionError(f'image size {size}: only square images are supported')
    size = size[0]
  return int(size)


def infer(tensors: dict) -> dict:
  """A model config read off a state dict's shapes (native towers; heads = width / 64)."""
  def blocks(prefix):
    idx = {int(k[len(prefix):].split('.')[0]) for k in tensors if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0

  def hidden(prefix, width):
    key = f'{prefix}0.mlp.c_fc.weight'
    return arch_lib.mlp_ratio_for(width, tensors[key].shape[0], 'mlp') if key in tensors else 4.0

  try:
    vocab, width = tensors['token_embedding.weight'].shape
    text = dict(context_length=tensors['positional_embedding'].shape[0], vocab_size=vocab,
                width=width, heads=max(width // 64, 1), layers=blocks('transformer.resblocks.'),
                mlp_ratio=hidden('transformer.resblocks.', width),
                ls_init_value=1e-5 if 'transformer.resblocks.0.ls_1.gamma' in tensors else None)
    embed_dim = tensors['text_projection'].shape[1]
    if 'visual.trunk.patch_embed.proj.weight' in tensors:
      vision = {'timm_model_name': 'unknown', 'timm_pool': 'avg'}
      logger.warning('no config for the timm image tower: OpenCLIP\'s default timm_pool '
                     "'avg' is assumed; name the config with --arch")
    else:
      vwidth, _, patch, _ = tensors['visual.conv1.weight'].shape
      grid = int(round((tensors['visual.positional_embedding'].shape[0] - 1) ** 0.5))
      vision = dict(image_size=grid * patch, patch_size=patch, width=vwidth, head_width=64,
                    layers=blocks('visual.transformer.resblocks.'),
                    mlp_ratio=hidden('visual.transformer.resblocks.', vwidth),
                    no_ln_pre='visual.ln_pre.weight' not in tensors,
                    ls_init_value=(1e-5 if 'visual.transformer.resblocks.0.ls_1.gamma' in tensors
                                   else None))
  except KeyError as e:
    raise ConversionError(f'cannot read an OpenCLIP architecture from the checkpoint: no {e}; '
                          'name its config with --arch') from None
  cfg = {'embed_dim': int(embed_dim), 'vision_cfg': vision, 'text_cfg': text}
  if 'logit_bias' in tensors:
    cfg['init_logit_bias'] = -10.0
  logger.warning('architecture read from the shapes: exact GELU assumed (OpenAI weights need '
                 "QuickGELU: --arch ViT-B-16-quickgelu or an open_clip_config.json)")
  return cfg


def named(name: str) -> dict:
  """The model config of ``--arch``: a JSON file, or an OpenCLIP model name."""
  if os.path.isfile(name):
    cfg = tensor_files.read_json(name)
    return cfg.get('model_cfg', cfg)
  spec = importlib.util.find_spec('open_clip')
  if spec is None or not spec.submodule_search_locations:
    raise ConversionError(f'--arch {name}: not a JSON file, and open_clip (whose model_configs/ '
                          'holds the named configs) is not installed')
  folder = os.path.join(list(spec.submodule_search_locations)[0], 'model_configs')
  path = os.path.join(folder, name.replace('/', '-') + '.json')
  if not os.path.isfile(path):
    close = sorted(f[:-5] for f in os.listdir(folder) if f.startswith(name.split('-')[0]))
    raise ConversionError(f'--arch {name}: no such OpenCLIP model config; e.g. {close[:8]}')
  return tensor_files.read_json(path)


def _number(x: float):
  return int(x) if float(x).is_integer() else x


def _text_cfg(text) -> dict:
  cfg = dict(context_length=text.context_length, vocab_size=text.vocab_size, width=text.width,
             heads=text.num_heads, layers=text.depth, mlp_ratio=_number(text.mlp_ratio))
  if text.layerscale_init is not None:
    cfg['ls_init_value'] = text.layerscale_init
  if not text.causal:
    cfg['no_causal_mask'] = True
  if text.norm_eps != OPENCLIP_EPS:
    cfg['norm_kwargs'] = {'eps': text.norm_eps}
  return cfg


def to_config(model, layout: str, trunk_args: dict | None = None) -> dict:
  """The OpenCLIP model config of one of our CLIP models in ``layout`` ('native' | 'timm').

  ``trunk_args``: timm ``VisionTransformer`` kwargs of the trunk (timm layout).
  """
  vision, text = model.visual, model.text
  cfg = {'embed_dim': model.embed_dim}
  if layout == 'native':
    if vision.act != text.act:
      raise ConversionError(f'OpenCLIP native towers share one activation (quick_gelu); this '
                            f'model has {vision.act!r} (image) and {text.act!r} (text)')
    v = dict(image_size=vision.img_size, patch_size=vision.patch_size, width=vision.embed_dim,
             head_width=vision.embed_dim // vision.num_heads, layers=vision.depth,
             mlp_ratio=_number(vision.mlp_ratio),
             pool_type={v: k for k, v in _POOLS.items()}[model.pool])
    if vision.layerscale_init is not None:
      v['ls_init_value'] = vision.layerscale_init
    if not vision.norm_pre:
      v['no_ln_pre'] = True
    if vision.norm_eps != OPENCLIP_EPS:
      v['norm_kwargs'] = {'eps': vision.norm_eps}
  else:
    v = dict(image_size=vision.img_size, timm_model_name=TIMM_ENTRY,
             timm_model_kwargs=trunk_args,
             timm_pool={v: k for k, v in _TIMM_POOLS.items()}[model.pool],
             timm_proj='linear', timm_proj_bias=False)
  if text.act == 'quick_gelu':
    cfg['quick_gelu'] = True
  cfg.update(vision_cfg=v, text_cfg=_text_cfg(text), init_logit_scale=model.init_logit_scale)
  if model.init_logit_bias is not None:
    cfg['init_logit_bias'] = model.init_logit_bias
  return cfg


def preprocess_config(model, overrides: dict | None = None) -> dict:
  """OpenCLIP's ``preprocess_cfg`` (OpenAI mean/std unless ``overrides`` say otherwise)."""
  cfg = dict(size=model.visual.img_size, mode='RGB', mean=list(OPENAI_MEAN), std=list(OPENAI_STD),
             interpolation='bicubic', resize_mode='shortest', fill_color=0)
  cfg.update(overrides or {})
  return cfg
