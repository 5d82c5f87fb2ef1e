"""DeiT-III exports (``timm`` format, ``layout='deit3'``, classifier head) load strictly
into timm's own DeiT-III model and give the same tokens and logits; the folder form
rebuilds by name; bad options are refused by name."""

import convert_testing as ct
import jax
import numpy as np
import pytest
import timm
from safetensors.torch import load_file
import torch

from vitreg_jax import convert
from vitreg_jax.convert.checks import ConversionError
from vitreg_jax.models.heads import ViTClassifier
from vitreg_jax.models.vit import VisionTransformer

WIDTH, HEADS, DEPTH, CLASSES = 64, 4, 2, 5
SIZES = ((64, 64), (48, 80))  # native grid, rectangular (resampled position embedding)


def classifier(num_registers: int):
  backbone = VisionTransformer(patch_size=16, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                               num_registers=num_registers, img_size=64, layerscale_init=1e-4,
                               interpolate_antialias=True, interpolate_offset=0.0)
  return ViTClassifier(backbone, CLASSES)


def random_classifier_variables(model, seed: int) -> dict:
  """Random backbone (convert_testing scales) + a random head."""
  backbone = ct.random_variables(model.backbone, seed)['params']
  rng = np.random.default_rng(seed + 1)
  head = {'kernel': (0.2 * rng.standard_normal((WIDTH, CLASSES))).astype(np.float32),
          'bias': (0.2 * rng.standard_normal(CLASSES)).astype(np.float32)}
  return {'params': {'backbone': backbone, 'head': head}}


def timm_deit3(num_registers: int):
  """timm's DeiT-III layout: no_embed_class with or without registers, class token pooled."""
  return ct.randomize_(timm.models.vision_transformer.VisionTransformer(
      img_size=64, patch_size=16, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
      num_classes=CLASSES, no_embed_class=True, init_values=1e-4, reg_tokens=num_registers,
      class_token=True, global_pool='token', dynamic_img_size=True), seed=99)


def export(model, variables, path):
  backbone_vars = {'params': variables['params']['backbone']}
  convert.save(model.backbone, backbone_vars, f'timm:{path}', layout='deit3',
               head=variables['params']['head'])


def assert_same_outputs(model, variables, timm_model):
  for height, width in SIZES:
    x = ct.images(height, width, batch=2, seed=height + width)
    ours = model.apply(variables, x.permute(0, 2, 3, 1).numpy())
    with torch.no_grad():
      tokens = timm_model.forward_features(x).numpy()
      logits = timm_model.forward_head(torch.from_numpy(tokens)).numpy()
    errors = ct.compare({k: np.asarray(ours[k]) for k in ('cls', 'registers', 'patches')},
                        tokens, model.backbone.num_registers)
    errors['logits'] = ct.rel_err(np.asarray(ours['logits']), logits)
    assert max(errors.values()) <= ct.TOL, ((height, width), errors)


@pytest.mark.parametrize('num_registers', [4, 0])
def test_deit3_export_loads_strictly_into_timm(num_registers, tmp_path):
  model = classifier(num_registers)
  variables = random_classifier_variables(model, seed=num_registers)
  export(model, variables, tmp_path / 'deit3.safetensors')
  state = load_file(tmp_path / 'deit3.safetensors')
  # DeiT-III's layout: the position embedding covers the patches only.
  assert state['pos_embed'].shape == (1, 16, WIDTH)
  assert state['head.weight'].shape == (CLASSES, WIDTH)
  ref = timm_deit3(num_registers)
  ref.load_state_dict(state, strict=True)
  assert_same_outputs(model, variables, ref)


def test_deit3_folder_export_rebuilds_by_name(tmp_path):
  model = classifier(4)
  variables = random_classifier_variables(model, seed=7)
  export(model, variables, tmp_path / 'deit3')
  ref = timm.create_model(f'local-dir:{tmp_path}/deit3', pretrained=True).eval()
  assert ref.num_classes == CLASSES and ref.num_reg_tokens == 4 and ref.no_embed_class
  assert_same_outputs(model, variables, ref)


def test_deit3_export_imports_back_as_the_same_backbone(tmp_path):
  """``convert.load`` reads the DeiT-III layout (dropping the head) into the same function."""
  model = classifier(4)
  variables = random_classifier_variables(model, seed=11)
  export(model, variables, tmp_path / 'deit3.safetensors')
  loaded, loaded_vars = convert.load(f'timm:{tmp_path}/deit3.safetensors', patch_size=16,
                                     num_heads=HEADS, img_size=64)
  assert loaded.num_registers == 4
  x = ct.images(64, 64, batch=2).permute(0, 2, 3, 1).numpy()
  want = model.apply(variables, x)
  got = loaded.apply(loaded_vars, x)
  for key in ('cls', 'registers', 'patches'):
    assert ct.rel_err(np.asarray(got[key]), np.asarray(want[key])) <= ct.TOL, key


def test_deit3_export_refuses_bad_options_by_name(tmp_path):
  model = classifier(4)
  variables = random_classifier_variables(model, seed=0)
  backbone_vars = {'params': variables['params']['backbone']}
  with pytest.raises(ConversionError, match=r"layout='deit2'.*valid: \('dinov2', 'deit3'\)"):
    convert.save(model.backbone, backbone_vars, f'timm:{tmp_path}/a.safetensors',
                 layout='deit2')
  wrong = jax.tree.map(lambda a: a[:-1], variables['params']['head'])  # kernel [63, 5]
  with pytest.raises(ConversionError, match=r'head: kernel \(63, 5\).*embed_dim 64'):
    convert.save(model.backbone, backbone_vars, f'timm:{tmp_path}/b.safetensors',
                 layout='deit3', head=wrong)
  with pytest.raises(ConversionError, match=r"expected the params of a Dense"):
    convert.save(model.backbone, backbone_vars, f'timm:{tmp_path}/c.safetensors',
                 head={'w': variables['params']['head']['kernel']})
  assert not list(tmp_path.iterdir())  # nothing written by a refused export
