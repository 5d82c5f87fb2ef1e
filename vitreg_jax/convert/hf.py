"""HF transformers ``Dinov2WithRegistersModel`` / ``Dinov2Model`` folders.

A ``save_pretrained``-style folder: ``config.json`` + ``model.safetensors``
(sharded ``model.safetensors.index.json`` and ``pytorch_model.bin`` are read
too). Written as a map from the DINOv2 hub layout.

Names are the Hub checkpoints' (``attention.attention.query``,
``mlp.weights_in`` ...): transformers 4.x loads them as they are, and 5.x maps
them onto its ``q_proj``/``gate_proj`` modules when loading (and back when
saving), so an export loads in both. Imports also accept the 5.x module names
(a hand-saved ``model.state_dict()``) and a ``dinov2.`` /
``dinov2_with_registers.`` prefix (classification checkpoints; the classifier
is dropped).

HF always has LayerScale: a model without it is exported with gammas of ones;
likewise a zero patch-embedding bias for a model without one. QuickGELU is
``hidden_act='quick_gelu'``; a pre-norm (OpenCLIP-style) tower has no HF form.
Position embeddings are resampled by size, antialiased for
``Dinov2WithRegisters`` and plain bicubic for ``Dinov2Model``; imports take
that convention from ``model_type``.
"""

import logging
import os
import re

from vitreg_jax.convert import dinov2, layout, tensor_files
from vitreg_jax.convert.checks import ConversionError
from vitreg_jax.convert.layout import Rule, Table

NAME = 'hf'
logger = logging.getLogger('vitreg_jax.convert')

# Left: DINOv2 hub names; right: HF Hub names.
RENAMES = Table((
    Rule('cls_token', 'embeddings.cls_token'),
    Rule('mask_token', 'embeddings.mask_token'),
    Rule('pos_embed', 'embeddings.position_embeddings'),
    Rule('register_tokens', 'embeddings.register_tokens'),
    Rule('patch_embed.proj.{p}', 'embeddings.patch_embeddings.projection.{p}'),
    Rule('blocks.{i}.norm1.{p}', 'encoder.layer.{i}.norm1.{p}'),
    Rule('blocks.{i}.attn.proj.{p}', 'encoder.layer.{i}.attention.output.dense.{p}'),
    Rule('blocks.{i}.ls1.gamma', 'encoder.layer.{i}.layer_scale1.lambda1'),
    Rule('blocks.{i}.norm2.{p}', 'encoder.layer.{i}.norm2.{p}'),
    Rule('blocks.{i}.mlp.fc1.{p}', 'encoder.layer.{i}.mlp.fc1.{p}'),
    Rule('blocks.{i}.mlp.fc2.{p}', 'encoder.layer.{i}.mlp.fc2.{p}'),
    Rule('blocks.{i}.mlp.w12.{p}', 'encoder.layer.{i}.mlp.weights_in.{p}'),
    Rule('blocks.{i}.mlp.w3.{p}', 'encoder.layer.{i}.mlp.weights_out.{p}'),
    Rule('blocks.{i}.ls2.gamma', 'encoder.layer.{i}.layer_scale2.lambda1'),
    Rule('norm.{p}', 'layernorm.{p}'),
))
# The packed DINOv2 qkv is split by rows into three HF linears.
_QKV_HUB = re.compile(r'^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$')
_QKV_HF = re.compile(
    r'^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$')
_QKV_PARTS = ('query', 'key', 'value')
# transformers 5.x module names -> Hub names.
_V5_RENAMES = (('.attention.q_proj.', '.attention.attention.query.'),
               ('.attention.k_proj.', '.attention.attention.key.'),
               ('.attention.v_proj.', '.attention.attention.value.'),
               ('.attention.o_proj.', '.attention.output.dense.'),
               ('.mlp.down_proj.', '.mlp.weights_out.'))
_V5_GATE = re.compile(r'^(encoder\.layer\.\d+\.mlp\.)gate_proj\.(weight|bias)$')
_ANCHOR = 'embeddings.patch_embeddings.projection.weight'
_MODEL_TYPES = {'dinov2': 'Dinov2Model', 'dinov2_with_registers': 'Dinov2WithRegistersModel'}
_ACTS = ('gelu', 'quick_gelu')  # transformers' ACT2FN names = ours


def to_hub(tensors: dict) -> dict:
  hub, qkv = {}, {}
  for name, x in tensors.items():
    m = _QKV_HF.match(name)
    if m:
      qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = x
      continue
    hub_name, _ = RENAMES.ours_name(name)
    hub[hub_name or name] = x
  for (i, p), parts in qkv.items():
    hub[f'blocks.{i}.attn.qkv.{p}'] = layout.concat([parts[k] for k in _QKV_PARTS], axis=0)
  return hub


def from_hub(hub: dict, model, like=None) -> dict:
  del like
  out = {}
  for name, x in hub.items():
    m = _QKV_HUB.match(name)
    if m:
      for part, rows in zip(_QKV_PARTS, layout.split3(x)):
        out[f'encoder.layer.{m.group(1)}.attention.attention.{part}.{m.group(2)}'] = rows
      continue
    hf_name, _ = RENAMES.theirs_name(name)
    out[hf_name or name] = x
  if model.layerscale_init is None:
    ones = layout.ones((model.embed_dim,), hub['norm.weight'])
    for i in range(model.depth):
      out[f'encoder.layer.{i}.layer_scale1.lambda1'] = ones
      out[f'encoder.layer.{i}.layer_scale2.lambda1'] = ones
  return out


def normalise(tensors: dict) -> dict:
  """Hub names from prefixed classification checkpoints or 5.x module names."""
  prefixes = {k[:-len(_ANCHOR)] for k in tensors if k.endswith(_ANCHOR)}
  if len(prefixes) == 1 and (prefix := prefixes.pop()):
    dropped = sorted(k for k in tensors if not k.startswith(prefix))
    if dropped:
      logger.info('dropped %s (not part of the backbone)', ', '.join(dropped))
    tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  out = {}
  for name, x in tensors.items():
    m = _V5_GATE.match(name)
    if m:
      up = tensors[f'{m.group(1)}up_proj.{m.group(2)}']
      out[f'{m.group(1)}weights_in.{m.group(2)}'] = layout.concat([x, up], axis=0)
      continue
    if '.mlp.up_proj.' in name:
      continue
    for new, old in _V5_RENAMES:
      name = name.replace(new, old)
    out[name] = x
  return out


def _square(value, key: str, path: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ConversionError(f'{path}: {key}={value}; only square sizes are supported')
    value = value[0]
  return int(value)


def config_to_arch(cfg: dict, path: str) -> dict:
  """Our model kwargs from an HF Dinov2 / Dinov2WithRegisters config."""
  model_type = cfg.get('model_type')
  if model_type not in _MODEL_TYPES:
    raise ConversionError(
        f'{path}: model_type {model_type!r}; expected one of {sorted(_MODEL_TYPES)}')
  registers = model_type == 'dinov2_with_registers'
  swiglu = bool(cfg.get('use_swiglu_ffn', False))
  for key, want in (('qkv_bias', True), ('num_channels', 3)):
    if cfg.get(key, want) != want:
      raise ConversionError(f'{path}: {key}={cfg[key]!r} is not supported (only {want!r})')
  act = 'gelu' if swiglu else cfg.get('hidden_act', 'gelu')  # HF's SwiGLU ignores hidden_act
  if act not in _ACTS:
    raise ConversionError(f'{path}: hidden_act={act!r} is not supported (only {_ACTS})')
  return dict(
      patch_size=_square(cfg.get('patch_size', 16 if registers else 14), 'patch_size', path),
      embed_dim=cfg.get('hidden_size', 768), depth=cfg.get('num_hidden_layers', 12),
      num_heads=cfg.get('num_attention_heads', 12), mlp_ratio=float(cfg.get('mlp_ratio', 4)),
      ffn='swiglu' if swiglu else 'mlp',
      num_registers=cfg.get('num_register_tokens', 4) if registers else 0,
      class_token=True, layerscale_init=float(cfg.get('layerscale_value', 1.0)),
      img_size=_square(cfg.get('image_size', 224), 'image_size', path),
      norm_eps=cfg.get('layer_norm_eps', 1e-6),
      interpolate_antialias=registers, interpolate_offset=0.0,
      norm_pre=False, patch_bias=True, act=act)


def model_config(model) -> dict:
  """``config.json`` for ``Dinov2WithRegistersModel`` (or ``Dinov2Model`` without registers)."""
  if not model.class_token:
    raise ConversionError('HF Dinov2 models always have a class token; this model has none')
  registers = model.num_registers > 0
  model_type = 'dinov2_with_registers' if registers else 'dinov2'
  if (model.interpolate_antialias, model.interpolate_offset) != (registers, 0.0):
    logger.warning(
        '%s resamples position embeddings %s; this model uses antialias=%s, offset=%s, so '
        'outputs at sizes other than %d differ slightly', _MODEL_TYPES[model_type],
        'antialiased by size' if registers else 'by size without antialias',
        model.interpolate_antialias, model.interpolate_offset, model.img_size)
  ratio = model.mlp_ratio
  cfg = {
      'architectures': [_MODEL_TYPES[model_type]], 'model_type': model_type,
      'hidden_size': model.embed_dim, 'num_hidden_layers': model.depth,
      'num_attention_heads': model.num_heads,
      'mlp_ratio': int(ratio) if float(ratio).is_integer() else ratio,
      'hidden_act': model.act, 'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
      'initializer_range': 0.02, 'layer_norm_eps': model.norm_eps,
      'image_size': model.img_size, 'patch_size': model.patch_size, 'num_channels': 3,
      'qkv_bias': True,
      'layerscale_value': 1.0 if model.layerscale_init is None else model.layerscale_init,
      'drop_path_rate': 0.0, 'use_swiglu_ffn': model.ffn == 'swiglu',
  }
  if registers:
    cfg['num_register_tokens'] = model.num_registers
  else:
    cfg['use_mask_token'] = True
  return cfg


def _weights(folder: str) -> dict:
  single = os.path.join(folder, 'model.safetensors')
  index = os.path.join(folder, 'model.safetensors.index.json')
  legacy = os.path.join(folder, 'pytorch_model.bin')
  if os.path.isfile(single):
    return tensor_files.read_tensors(single)
  if os.path.isfile(index):
    shards = sorted(set(tensor_files.read_json(index)['weight_map'].values()))
    out = {}
    for shard in shards:
      out.update(tensor_files.read_tensors(os.path.join(folder, shard)))
    return out
  if os.path.isfile(legacy):
    return tensor_files.read_tensors(legacy)
  raise ConversionError(
      f'{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin')


def read(path: str):
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  config_path = os.path.join(folder, 'config.json')
  if not os.path.isfile(config_path):
    raise ConversionError(f'{path}: an HF model folder needs config.json (save_pretrained layout)')
  carried = config_to_arch(tensor_files.read_json(config_path), config_path)
  tensors = tensor_files.read_tensors(path) if os.path.isfile(path) else _weights(folder)
  return normalise(tensors), carried


def hub_shapes(tensors: dict) -> dict:
  return layout.shapes_of(to_hub, tensors)


def convention(num_registers: int) -> dict:
  del num_registers
  return {}  # carried by model_type, see config_to_arch


def from_ours(ours: dict, model, like=None) -> dict:
  dinov2.refuse_unless(model, 'HF Dinov2', quick_gelu=True)
  return from_hub(dinov2.with_patch_bias(dinov2.ours_to_hub(ours)), model, like)


def to_ours(tensors: dict, expected: dict) -> dict:
  return dinov2.hub_to_ours(to_hub(tensors), expected)


def write(tensors: dict, model, path: str) -> None:
  config = model_config(model)
  with tensor_files.atomic_dir(path) as tmp:
    tensor_files.write_tensors(tensors, os.path.join(tmp, 'model.safetensors'),
                               metadata={'format': 'pt'})
    tensor_files.write_json(config, os.path.join(tmp, 'config.json'))
