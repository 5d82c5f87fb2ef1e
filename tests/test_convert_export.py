"""Exports load into timm / HF with strict key matching and give the same outputs;
round trips between formats are exact."""

import os
import subprocess
import sys

import convert_testing as ct
import jax
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from transformers import Dinov2Model, Dinov2WithRegistersModel

from vitreg_jax import convert
from vitreg_jax.models.vit import VisionTransformer


def our_model(config: str, antialias: bool, **overrides) -> VisionTransformer:
  """A ViT-S-width model of one of the test configs, resampling as the destination does."""
  kwargs = dict(patch_size=14, embed_dim=ct.WIDTH, depth=ct.DEPTH, num_heads=ct.HEADS,
                num_registers=ct.NUM_REGISTERS[config], img_size=518,
                ffn='swiglu' if config == 'swiglu' else 'mlp',
                interpolate_antialias=antialias, interpolate_offset=0.0)
  kwargs.update(overrides)
  return VisionTransformer(**kwargs)


def assert_parity(model, variables, torch_model, sizes=ct.SIZES):
  for height, width in sizes:
    x = ct.images(height, width, seed=height + width)
    errors = ct.compare(ct.jax_outputs(model, variables, x), ct.torch_tokens(torch_model, x),
                        model.num_registers)
    assert max(errors.values()) <= ct.TOL, ((height, width), errors)


def assert_same_state(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    assert torch.equal(got[name], value), name


@pytest.mark.parametrize('config', sorted(ct.CONFIGS))
def test_export_to_timm_loads_strictly(config, tmp_path):
  model = our_model(config, antialias=True)
  variables = ct.random_variables(model, seed=3)
  convert.save(model, variables, f'timm:{tmp_path}/model.safetensors')
  ref = ct.timm_model(config, seed=99)  # other random values, all overwritten below
  ref.load_state_dict(load_file(tmp_path / 'model.safetensors'), strict=True)
  assert_parity(model, variables, ref)


@pytest.mark.parametrize('config', ['reg4', 'swiglu'])
def test_export_to_timm_folder_creates_by_name(config, tmp_path):
  """The folder form carries a config: timm.create_model('local-dir:...') rebuilds it."""
  model = our_model(config, antialias=True)
  variables = ct.random_variables(model, seed=4)
  convert.save(model, variables, f'timm:{tmp_path}/timm_model')
  ref = timm.create_model(f'local-dir:{tmp_path}/timm_model', pretrained=True).eval()
  assert ref.num_classes == 0
  assert_parity(model, variables, ref, sizes=((518, 518), (224, 308)))
  # The config also carries num_heads back for a non-standard width.
  again, _ = convert.load(f'timm:{tmp_path}/timm_model')
  assert again.num_heads == model.num_heads


@pytest.mark.parametrize('config', sorted(ct.CONFIGS))
def test_export_to_hf_loads_strictly(config, tmp_path):
  registers = ct.NUM_REGISTERS[config] > 0
  model = our_model(config, antialias=registers)
  variables = ct.random_variables(model, seed=5)
  convert.save(model, variables, f'hf:{tmp_path}/hf_model')
  cls = Dinov2WithRegistersModel if registers else Dinov2Model
  ref, info = cls.from_pretrained(tmp_path / 'hf_model', output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys',
                                   'error_msgs')), info
  assert_parity(model, variables, ref.eval())


def test_export_to_hf_without_layerscale_writes_ones(tmp_path, caplog):
  """Plain ViT (no LayerScale, legacy resampling): HF gets gammas of ones and a warning."""
  model = our_model('noreg', antialias=False, layerscale_init=None, interpolate_offset=0.1)
  variables = ct.random_variables(model, seed=6)
  convert.save(model, variables, f'hf:{tmp_path}/hf_model')
  assert 'differ slightly' in caplog.text
  ref, info = Dinov2Model.from_pretrained(tmp_path / 'hf_model', output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys'))
  assert torch.equal(ref.encoder.layer[1].layer_scale2.lambda1, torch.ones(ct.WIDTH))
  assert_parity(model, variables, ref.eval(), sizes=((518, 518),))


@pytest.mark.parametrize('config', ['reg4', 'swiglu'])
def test_export_to_dinov2_hub_matches_hand_written_map(config, tmp_path):
  model = our_model(config, antialias=True)
  variables = ct.random_variables(model, seed=7)
  convert.save(model, variables, f'dinov2:{tmp_path}/hub.pth')
  convert.save(model, variables, f'hf:{tmp_path}/hf_model')
  hf = Dinov2WithRegistersModel.from_pretrained(tmp_path / 'hf_model')
  hub = torch.load(tmp_path / 'hub.pth', weights_only=True)
  assert_same_state(hub, ct.hf_to_hub_reference(hf.state_dict(), ct.DEPTH))
  assert len(hub) == 8 + 14 * ct.DEPTH  # REFERENCE §2: 8 + 14 * 12 = 176 keys for ViT-S/B


@pytest.mark.parametrize('weights', ['safetensors', 'msgpack'])
def test_vitreg_round_trip_is_exact_and_scan_agnostic(weights, tmp_path):
  model = our_model('swiglu', antialias=True, layerscale_init=None, interpolate_offset=0.1)
  variables = ct.random_variables(model, seed=8)
  scanned = model.clone(scan_blocks=True)
  scanned_vars = convert.params.to_variables(convert.params.canonical(variables), True)
  convert.save(scanned, scanned_vars, f'vitreg:{tmp_path}/ours', weights=weights)
  assert os.path.isfile(tmp_path / 'ours' / convert.vitreg.WEIGHT_FILES[weights])
  loaded, got = convert.load(f'vitreg:{tmp_path}/ours', scan_blocks=True)
  assert loaded.scan_blocks and 'blocks' in got['params']
  for field in convert.arch.ARCH_FIELDS:
    assert getattr(loaded, field) == getattr(model, field), field
  jax.tree.map(np.testing.assert_array_equal, got, scanned_vars)


def test_vitreg_loads_without_torch(tmp_path):
  model = our_model('reg4', antialias=True)
  variables = ct.random_variables(model, seed=9)
  convert.save(model, variables, f'vitreg:{tmp_path}/ours')
  x = ct.images(224, 308, batch=1)
  want = ct.jax_outputs(model, variables, x)['patches']
  np.save(tmp_path / 'x.npy', x.permute(0, 2, 3, 1).numpy())
  script = (
      'import sys; sys.modules["torch"] = None\n'  # any torch import now fails
      'import jax, numpy as np\n'
      'jax.config.update("jax_default_matmul_precision", "highest")\n'
      'from vitreg_jax import convert\n'
      f'model, variables = convert.load("vitreg:{tmp_path}/ours")\n'
      f'out = model.apply(variables, np.load("{tmp_path}/x.npy"))\n'
      f'np.save("{tmp_path}/patches.npy", np.asarray(out["patches"]))\n'
      'assert "timm" not in sys.modules and "transformers" not in sys.modules\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  subprocess.run([sys.executable, '-c', script], check=True, env=env, timeout=300)
  assert ct.rel_err(np.load(tmp_path / 'patches.npy'), want) <= ct.TOL


def test_round_trip_timm_hf_timm_is_exact(tmp_path):
  ref = ct.timm_model('swiglu', seed=10)
  original = {k: v.clone() for k, v in ref.state_dict().items()}
  save_file(original, tmp_path / 'timm.safetensors')
  model, variables = convert.load(f'timm:{tmp_path}/timm.safetensors')
  convert.save(model, variables, f'hf:{tmp_path}/hf_model')
  model, variables = convert.load(f'hf:{tmp_path}/hf_model')
  convert.save(model, variables, f'timm:{tmp_path}/back.safetensors')
  assert_same_state(load_file(tmp_path / 'back.safetensors'), original)


@pytest.mark.parametrize('config', ['reg4', 'noreg'])
def test_round_trip_hf_timm_hf_is_exact(config, tmp_path):
  """Weights come back bit for bit except what timm cannot hold: the mask token
  (zeros) and, in timm's register layout (no_embed_class), the cls position
  embedding, folded into cls_token. The outputs are bitwise equal."""
  ref = ct.hf_model(config, seed=11)
  ref.save_pretrained(tmp_path / 'hf_model')
  model, variables = convert.load(f'hf:{tmp_path}/hf_model')
  convert.save(model, variables, f'timm:{tmp_path}/timm.safetensors')
  model, variables = convert.load(f'timm:{tmp_path}/timm.safetensors')
  assert (model.interpolate_antialias, model.interpolate_offset) == (True, 0.0)
  # Back to HF with the HF convention, as a user re-exporting would do.
  model = model.clone(interpolate_antialias=config == 'reg4')
  convert.save(model, variables, f'hf:{tmp_path}/back')
  back = type(ref).from_pretrained(tmp_path / 'back').eval()
  want, got = ref.state_dict(), back.state_dict()
  assert sorted(got) == sorted(want)
  folded = config == 'reg4'
  pos0 = want['embeddings.position_embeddings'][:, :1]
  for name, value in want.items():
    if name == 'embeddings.mask_token':
      assert not got[name].any()
    elif folded and name == 'embeddings.cls_token':
      assert torch.equal(got[name], value + pos0)
    elif folded and name == 'embeddings.position_embeddings':
      assert not got[name][:, 0].any() and torch.equal(got[name][:, 1:], value[:, 1:])
    else:
      assert torch.equal(got[name], value), name
  for size in ct.SIZES:
    x = ct.images(*size, batch=1)
    assert np.array_equal(ct.torch_tokens(back, x), ct.torch_tokens(ref, x)), size


def test_training_size_export_carries_its_grid_and_loads_everywhere(tmp_path):
  """DINOv2 trains at the global crop size (224 / 14 -> a 16x16 pos_embed, REFERENCE §3).

  The exports keep that grid: timm built at 224, HF with image_size 224 and the
  hub layout with pos_embed [1, 257, D] load them strictly, give our features at
  224 (no resampling) and resample identically at other sizes (518 upsamples).
  """
  model = our_model('reg4', antialias=True, img_size=224)
  variables = ct.random_variables(model, seed=12)
  assert variables['params']['pos_embed'].shape == (1, 1 + 16 * 16, ct.WIDTH)
  sizes = ((224, 224), (224, 308), (518, 518))

  convert.save(model, variables, f'timm:{tmp_path}/model.safetensors')
  ref = ct.timm_model('reg4', seed=98, img_size=224)
  ref.load_state_dict(load_file(tmp_path / 'model.safetensors'), strict=True)
  assert ref.pos_embed.shape == (1, 256, ct.WIDTH)
  assert_parity(model, variables, ref, sizes)

  convert.save(model, variables, f'hf:{tmp_path}/hf_model')
  hf, info = Dinov2WithRegistersModel.from_pretrained(tmp_path / 'hf_model',
                                                      output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys'))
  assert hf.config.image_size == 224
  assert_parity(model, variables, hf.eval(), sizes)

  convert.save(model, variables, f'dinov2:{tmp_path}/hub.pth')
  hub = torch.load(tmp_path / 'hub.pth', weights_only=True)
  assert tuple(hub['pos_embed'].shape) == (1, 257, ct.WIDTH)
  assert_same_state(hub, ct.hf_to_hub_reference(hf.state_dict(), ct.DEPTH))
  again, got = convert.load(f'dinov2:{tmp_path}/hub.pth')
  assert again.img_size == 224
  jax.tree.map(np.testing.assert_array_equal, got, variables)
