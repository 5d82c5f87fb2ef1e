"""Full-size architectures: our name maps give exactly the keys and shapes of the
released layouts, and the architecture is read back from those shapes.

The torch models are built on the ``meta`` device (shapes only, nothing
allocated), so ViT-g costs nothing.
"""

import jax
import numpy as np
import pytest
import timm as timm_lib
import torch
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from vitreg_jax.convert import arch, dinov2, hf, layout, params, timm
from vitreg_jax.models.vit import get_arch

# name -> (DINOv2 hub key count from REFERENCE §2, timm model name)
RELEASED = {
    'vits14_reg': (176, 'vit_small_patch14_reg4_dinov2'),
    'vitb14_reg': (176, 'vit_base_patch14_reg4_dinov2'),
    'vitl14_reg': (344, 'vit_large_patch14_reg4_dinov2'),
    'vitg14_reg': (568, 'vit_giant_patch14_reg4_dinov2'),
    'vitl14': (343, 'vit_large_patch14_dinov2'),  # the same minus register_tokens
}


def _specs(state_dict) -> dict:
  return {k: jax.ShapeDtypeStruct(tuple(v.shape), np.float32) for k, v in state_dict.items()}


def _expected(fmt, model) -> dict:
  return layout.shapes_of(lambda p: fmt.from_ours(p, model), params.expected_shapes(model))


@pytest.mark.parametrize('name', sorted(RELEASED))
def test_hub_layout_key_count_and_inference(name):
  model = get_arch(name)
  hub = _expected(dinov2, model)
  assert len(hub) == RELEASED[name][0]
  assert hub['pos_embed'] == (1, 1370, model.embed_dim)
  inferred, grid = arch.infer_from_hub_shapes(hub)
  assert grid == 37
  assert arch.describe(inferred).startswith(name + ' ')


@pytest.mark.parametrize('name', sorted(RELEASED))
def test_timm_layout_equals_timm_models(name):
  model = get_arch(name)
  with torch.device('meta'):
    ref = timm_lib.create_model(RELEASED[name][1], pretrained=False, num_classes=0, img_size=518)
  want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  assert _expected(timm, model) == want
  inferred, _ = arch.infer_from_hub_shapes(timm.hub_shapes(_specs(ref.state_dict())))
  assert arch.describe(inferred).startswith(name + ' ')


@pytest.mark.parametrize('name', ['vits14_reg', 'vitg14_reg'])
def test_hf_layout_equals_transformers_models(name):
  model = get_arch(name)
  config = hf.model_config(model)
  want = {k: getattr(model, k) for k in arch.ARCH_FIELDS}
  assert hf.config_to_arch(config, 'config.json') == want
  with torch.device('meta'):
    ref = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        **{k: v for k, v in config.items() if k not in ('architectures', 'model_type')}))
  # transformers 5.x modules (q_proj, gate_proj ...) mapped back to the Hub names.
  got = layout.shapes_of(hf.normalise, _specs(ref.state_dict()))
  assert got == _expected(hf, model)
