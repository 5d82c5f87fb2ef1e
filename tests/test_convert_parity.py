"""Imported timm / HF / DINOv2-hub weights reproduce the torch models' outputs.

Each random torch model is saved in its own format, imported, and compared on
cls, registers and patches (after the final norm) at 518² (the native grid),
224² (resampled position embeddings) and 224x308 (rectangular): relative error
max|jax - torch| / max|torch| <= 1e-5 in float32.
"""

import math

import convert_testing as ct
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer as TimmViT

from vitreg_jax import convert


def assert_parity(model, variables, torch_model, num_registers, sizes=ct.SIZES):
  for height, width in sizes:
    x = ct.images(height, width)
    errors = ct.compare(ct.jax_outputs(model, variables, x), ct.torch_tokens(torch_model, x),
                        num_registers)
    assert max(errors.values()) <= ct.TOL, ((height, width), errors)


@pytest.mark.parametrize('config', sorted(ct.CONFIGS))
def test_timm_import_matches_timm(config, tmp_path):
  ref = ct.timm_model(config)
  save_file(ref.state_dict(), tmp_path / 'model.safetensors')
  model, variables = convert.load(f'timm:{tmp_path}/model.safetensors')
  r = ct.NUM_REGISTERS[config]
  assert (model.embed_dim, model.depth, model.num_heads, model.num_registers) == (
      ct.WIDTH, ct.DEPTH, ct.HEADS, r)
  assert model.ffn == ('swiglu' if config == 'swiglu' else 'mlp')
  assert (model.interpolate_antialias, model.interpolate_offset) == (True, 0.0)  # timm resamples so
  assert not np.any(variables['params']['mask_token'])
  assert_parity(model, variables, ref, r)


def test_timm_plain_patch16_with_classifier_head(tmp_path):
  """Original ViT layout: pos_embed covers cls, no LayerScale, a head to drop."""
  ref = ct.randomize_(TimmViT(img_size=224, patch_size=16, embed_dim=ct.WIDTH, depth=ct.DEPTH,
                              num_heads=ct.HEADS, num_classes=10, dynamic_img_size=True), 1)
  torch.save(ref.state_dict(), tmp_path / 'vit.pth')
  model, variables = convert.load(f'timm:{tmp_path}/vit.pth')
  assert (model.patch_size, model.img_size, model.layerscale_init, model.num_registers) == (
      16, 224, None, 0)
  assert_parity(model, variables, ref, 0, sizes=((224, 224), (160, 160), (224, 320)))


@pytest.mark.parametrize('config', sorted(ct.CONFIGS))
def test_hf_import_matches_transformers(config, tmp_path):
  ref = ct.hf_model(config)
  ref.save_pretrained(tmp_path)
  model, variables = convert.load(f'hf:{tmp_path}')
  r = ct.NUM_REGISTERS[config]
  assert model.num_registers == r
  # Dinov2WithRegisters resamples antialiased by size; Dinov2Model plain bicubic by size.
  assert (model.interpolate_antialias, model.interpolate_offset) == (r > 0, 0.0)
  assert_parity(model, variables, ref, r)


def test_hf_import_accepts_v5_names_and_classifier_prefix(tmp_path):
  """A hand-saved 5.x ``state_dict()`` under a classification prefix loads the same."""
  ref = ct.hf_model('swiglu')
  ref.save_pretrained(tmp_path / 'pretrained')
  state = {f'dinov2_with_registers.{k}': v for k, v in ref.state_dict().items()}
  state['classifier.weight'] = torch.zeros(3, 2 * ct.WIDTH)
  (tmp_path / 'v5').mkdir()
  save_file(state, tmp_path / 'v5' / 'model.safetensors')
  ref.config.to_json_file(tmp_path / 'v5' / 'config.json')
  assert any('q_proj' in k for k in state) and any('gate_proj' in k for k in state)
  _, expected = convert.load(f'hf:{tmp_path}/pretrained')
  _, got = convert.load(f'hf:{tmp_path}/v5')
  flat_expected, flat_got = convert.params.canonical(expected), convert.params.canonical(got)
  assert flat_expected.keys() == flat_got.keys()
  for name, value in flat_expected.items():
    np.testing.assert_array_equal(flat_got[name], value, err_msg=name)


@pytest.mark.parametrize('config', ['reg4', 'swiglu'])
def test_dinov2_hub_state_dict_from_hf_weights(config, tmp_path):
  ref = ct.hf_model(config)
  torch.save(ct.hf_to_hub_reference(ref.state_dict(), ct.DEPTH), tmp_path / 'hub.pth')
  model, variables = convert.load(f'dinov2:{tmp_path}/hub.pth')
  assert (model.interpolate_antialias, model.interpolate_offset) == (True, 0.0)
  assert_parity(model, variables, ref, 4)


def test_dinov2_hub_state_dict_from_timm_weights(tmp_path):
  """Hub dict by the inverse timm map: hub cls = timm cls, hub pos[:, 0] = 0."""
  ref = ct.timm_model('swiglu')
  sd = ref.state_dict()
  hub = {'cls_token': sd['cls_token'], 'register_tokens': sd['reg_token'],
         'pos_embed': torch.cat([torch.zeros(1, 1, ct.WIDTH), sd['pos_embed']], dim=1),
         'mask_token': torch.zeros(1, ct.WIDTH)}
  for k, v in sd.items():
    if k not in ('cls_token', 'reg_token', 'pos_embed'):
      hub[k.replace('mlp.fc1', 'mlp.w12').replace('mlp.fc2', 'mlp.w3')] = v
  save_file(hub, tmp_path / 'hub.safetensors')
  model, variables = convert.load(f'dinov2:{tmp_path}/hub.safetensors')
  assert model.ffn == 'swiglu'
  assert_parity(model, variables, ref, 4)


def _use_dinov2_legacy_resampling(hf_model):
  """Makes an HF Dinov2Model resample like the non-register DINOv2 hub models:
  torch bicubic, no antialias, scale factor (grid + 0.1) / M (REFERENCE §1.10)."""
  emb = hf_model.embeddings
  patch = emb.patch_size

  def interpolate_pos_encoding(embeddings, height, width):
    pos = emb.position_embeddings
    n = pos.shape[1] - 1
    m = math.isqrt(n)
    h0, w0 = height // patch, width // patch
    if embeddings.shape[1] - 1 == n and height == width:
      return pos
    grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, scale_factor=((h0 + 0.1) / m, (w0 + 0.1) / m), mode='bicubic',
                         antialias=False)
    assert grid.shape[-2:] == (h0, w0)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)

  emb.interpolate_pos_encoding = interpolate_pos_encoding
  return hf_model


def test_dinov2_hub_without_registers_uses_legacy_resampling(tmp_path):
  ref = ct.hf_model('noreg')
  torch.save(ct.hf_to_hub_reference(ref.state_dict(), ct.DEPTH), tmp_path / 'hub.pth')
  model, variables = convert.load(f'dinov2:{tmp_path}/hub.pth')
  assert (model.num_registers, model.interpolate_antialias, model.interpolate_offset) == (
      0, False, 0.1)
  assert_parity(model, variables, _use_dinov2_legacy_resampling(ref), 0)


def test_dinov2_training_checkpoint_nesting(tmp_path):
  """teacher/student backbones with heads and FSDP block chunks: the teacher is used."""
  teacher = ct.hf_to_hub_reference(ct.hf_model('reg4', seed=1).state_dict(), ct.DEPTH)
  student = ct.hf_to_hub_reference(ct.hf_model('reg4', seed=2).state_dict(), ct.DEPTH)

  def chunked(sd):  # two chunks of one block each: blocks.{chunk}.{i}.
    return {(f'blocks.{k.split(".")[1]}.{k[len("blocks."):]}' if k.startswith('blocks.') else k): v
            for k, v in sd.items()}

  nested = {
      'student': {**{f'backbone.{k}': v for k, v in chunked(student).items()},
                  'dino_head.last_layer.weight_g': torch.ones(8, 1)},
      'teacher': {**{f'backbone.{k}': v for k, v in chunked(teacher).items()},
                  'dino_head.last_layer.weight_g': torch.ones(8, 1),
                  'ibot_head.mlp.0.weight': torch.zeros(4, 4)},
      'iteration': 1250,
  }
  assert 'blocks.1.1.norm1.weight' in chunked(teacher)
  torch.save(nested, tmp_path / 'ckpt.pth')
  torch.save(teacher, tmp_path / 'flat.pth')
  _, got = convert.load(f'dinov2:{tmp_path}/ckpt.pth')
  _, want = convert.load(f'dinov2:{tmp_path}/flat.pth')
  flat_got, flat_want = convert.params.canonical(got), convert.params.canonical(want)
  assert flat_got.keys() == flat_want.keys()
  for name, value in flat_want.items():
    np.testing.assert_array_equal(flat_got[name], value, err_msg=name)
