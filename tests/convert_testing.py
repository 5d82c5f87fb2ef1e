"""Shared pieces of the converter tests: small random torch references and comparisons.

The torch models are timm's ``VisionTransformer`` and HF's
``Dinov2WithRegistersModel`` / ``Dinov2Model`` built from their own classes
with DINOv2-like settings (ViT-S width, 2 blocks) and every parameter
randomised, so that a wrong layout anywhere changes the outputs by far more
than the 1e-5 tolerance (LayerScale at 1e-5 would hide block errors).
"""

import functools

import jax
import numpy as np
import torch
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer as TimmViT
from transformers import (Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
                          Dinov2WithRegistersModel)

SIZES = ((518, 518), (224, 224), (224, 308))  # native grid, resampled, rectangular
TOL = 1e-5
WIDTH, HEADS, DEPTH = 384, 6, 2

# name -> (timm kwargs, HF config kwargs); 'swiglu' is a small giant-style model.
CONFIGS = {
    'reg4': (dict(reg_tokens=4, no_embed_class=True), dict(num_register_tokens=4)),
    'swiglu': (dict(reg_tokens=4, no_embed_class=True, mlp_ratio=2.66667 * 2,
                    mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU),
               dict(num_register_tokens=4, use_swiglu_ffn=True)),
    'noreg': (dict(), None),  # timm vit_*_patch14_dinov2 layout (pos_embed covers cls)
}
NUM_REGISTERS = {'reg4': 4, 'swiglu': 4, 'noreg': 0}


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Every parameter random, at scales that keep activations O(1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      n = torch.randn(p.shape, generator=gen)
      leaf = name.rsplit('.', 1)[-1]
      if 'norm' in name and leaf == 'weight':
        p.copy_(1 + 0.1 * n)
      elif leaf in ('gamma', 'lambda1'):
        p.copy_(0.5 + 0.2 * n)
      elif leaf in ('cls_token', 'reg_token', 'register_tokens', 'mask_token'):
        p.copy_(0.5 * n)
      elif leaf in ('pos_embed', 'position_embeddings'):
        p.copy_(0.2 * n)
      else:
        p.copy_(0.05 * n)
  return module.eval()


def timm_model(config: str, seed: int = 0, **overrides) -> TimmViT:
  kwargs = dict(img_size=518, patch_size=14, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                init_values=1e-5, num_classes=0, dynamic_img_size=True)
  kwargs.update(CONFIGS[config][0])
  kwargs.update(overrides)
  return randomize_(TimmViT(**kwargs), seed)


def hf_config(config: str, **overrides):
  common = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                image_size=518, patch_size=14)
  common.update(overrides)
  if CONFIGS[config][1] is None:
    return Dinov2Config(**common)
  return Dinov2WithRegistersConfig(**common, **CONFIGS[config][1])


def hf_model(config: str, seed: int = 0):
  cfg = hf_config(config)
  cls = Dinov2WithRegistersModel if isinstance(cfg, Dinov2WithRegistersConfig) else Dinov2Model
  return randomize_(cls(cfg), seed)


def images(height: int, width: int, batch: int | None = None, seed: int = 0) -> torch.Tensor:
  """Random NCHW images; by default 2 (per-sample broadcasting is exercised), 1 at 518²
  where the CPU forward is the slow part of the tests."""
  if batch is None:
    batch = 1 if height * width > 224 * 308 else 2
  return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def torch_tokens(model, x: torch.Tensor) -> np.ndarray:
  """Final-normed tokens ``[B, 1+R+N, D]`` of a timm or HF model."""
  with torch.no_grad():
    if isinstance(model, TimmViT):
      return model.forward_features(x).numpy()
    return model(pixel_values=x).last_hidden_state.numpy()


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, x):
  return model.apply(variables, x)  # compiled once per (architecture, shape) across tests


def jax_outputs(model, variables, x: torch.Tensor) -> dict:
  out = _apply(model, variables, x.permute(0, 2, 3, 1).numpy())
  return {k: np.asarray(out[k]) for k in ('cls', 'registers', 'patches')}


def split_tokens(tokens: np.ndarray, num_registers: int) -> dict:
  return {'cls': tokens[:, 0], 'registers': tokens[:, 1:1 + num_registers],
          'patches': tokens[:, 1 + num_registers:]}


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
  """max |got - ref| / max |ref| (0 for two empty arrays)."""
  if ref.size == 0 and got.shape == ref.shape:
    return 0.0
  return float(np.abs(got - ref).max() / np.abs(ref).max())


def compare(got: dict, ref_tokens: np.ndarray, num_registers: int) -> dict:
  """Relative error per output (shapes must match exactly)."""
  ref = split_tokens(ref_tokens, num_registers)
  errors = {}
  for key, value in ref.items():
    assert got[key].shape == value.shape, (key, got[key].shape, value.shape)
    errors[key] = rel_err(got[key], value)
  return errors


def hf_to_hub_reference(sd: dict, depth: int) -> dict:
  """DINOv2 hub state dict from an HF transformers 5.x ``state_dict()``.

  Written out by hand from REFERENCE §2, independently of the converters.
  """
  hub = {
      'cls_token': sd['embeddings.cls_token'],
      'pos_embed': sd['embeddings.position_embeddings'],
      'mask_token': sd['embeddings.mask_token'],
      'patch_embed.proj.weight': sd['embeddings.patch_embeddings.projection.weight'],
      'patch_embed.proj.bias': sd['embeddings.patch_embeddings.projection.bias'],
      'norm.weight': sd['layernorm.weight'],
      'norm.bias': sd['layernorm.bias'],
  }
  if 'embeddings.register_tokens' in sd:
    hub['register_tokens'] = sd['embeddings.register_tokens']
  for i in range(depth):
    a, b = f'encoder.layer.{i}.', f'blocks.{i}.'
    for p in ('weight', 'bias'):
      hub[f'{b}norm1.{p}'] = sd[f'{a}norm1.{p}']
      hub[f'{b}norm2.{p}'] = sd[f'{a}norm2.{p}']
      hub[f'{b}attn.qkv.{p}'] = torch.cat(
          [sd[f'{a}attention.{q}_proj.{p}'] for q in 'qkv'], dim=0)
      hub[f'{b}attn.proj.{p}'] = sd[f'{a}attention.o_proj.{p}']
      if f'{a}mlp.gate_proj.{p}' in sd:
        hub[f'{b}mlp.w12.{p}'] = torch.cat([sd[f'{a}mlp.gate_proj.{p}'], sd[f'{a}mlp.up_proj.{p}']])
        hub[f'{b}mlp.w3.{p}'] = sd[f'{a}mlp.down_proj.{p}']
      else:
        hub[f'{b}mlp.fc1.{p}'] = sd[f'{a}mlp.fc1.{p}']
        hub[f'{b}mlp.fc2.{p}'] = sd[f'{a}mlp.fc2.{p}']
    hub[f'{b}ls1.gamma'] = sd[f'{a}layer_scale1.lambda1']
    hub[f'{b}ls2.gamma'] = sd[f'{a}layer_scale2.lambda1']
  return {k: v.detach().clone() for k, v in hub.items()}


def random_variables(model, seed: int) -> dict:
  """Random params for one of our models, at the scales ``randomize_`` uses."""
  from vitreg_jax.convert import params  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  flat = {}
  for name, spec in params.expected_shapes(model).items():
    n = rng.standard_normal(spec.shape).astype(np.float32)
    leaf = name.rsplit('/', 1)[-1]
    if leaf == 'scale':
      flat[name] = 1 + 0.1 * n
    elif leaf == 'gamma':
      flat[name] = 0.5 + 0.2 * n
    elif leaf in ('cls_token', 'register_tokens', 'mask_token'):
      flat[name] = 0.5 * n
    elif leaf == 'pos_embed':
      flat[name] = 0.2 * n
    else:
      flat[name] = 0.05 * n
  return params.to_variables(flat, scan_blocks=False)
