"""OpenCLIP checkpoints: random tiny ``open_clip.CLIP`` models import with the same image and
text embeddings and logits; our towers export (native ViT, or a timm trunk with registers)
and load strictly into OpenCLIP from the folder's config; the image tower alone goes on to
timm; bad input is refused naming the key and shape."""

import json

import clip_testing as clt
import numpy as np
import open_clip
import pytest
import timm
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file

from vitreg_jax import convert
from vitreg_jax.convert import __main__ as cli
from vitreg_jax.convert.checks import ConversionError
from vitreg_jax.models.clip import logits

pytestmark = pytest.mark.usefixtures('one_torch_thread')

VISION_CFG = dict(image_size=clt.IMG, patch_size=clt.PATCH, width=clt.WIDTH, layers=clt.DEPTH,
                  head_width=clt.WIDTH // clt.HEADS)
TEXT_CFG = dict(context_length=clt.CONTEXT, vocab_size=clt.VOCAB, width=clt.TEXT_WIDTH,
                heads=clt.TEXT_HEADS, layers=clt.DEPTH)
# name -> (model config extras, vision_cfg extras): OpenAI-style QuickGELU with a SigLIP bias
# and LayerScale; plain GELU with average pooling.
VARIANTS = {
    'quickgelu_siglip': (dict(quick_gelu=True, init_logit_bias=-10.0),
                         dict(ls_init_value=1e-4)),
    'gelu_avg': ({}, dict(pool_type='avg')),
}


def model_config(variant: str) -> dict:
  top, vision = VARIANTS[variant]
  return {'embed_dim': clt.EMBED, 'vision_cfg': {**VISION_CFG, **vision}, 'text_cfg': TEXT_CFG,
          **top}


def reference(variant: str, seed: int = 0):
  return clt.randomize_open_clip_(open_clip.CLIP(**model_config(variant)), seed)


def write_state(model, path) -> None:
  save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, path)


def our_outputs(model, variables, x, ids) -> dict:
  out = model.apply(variables, x.permute(0, 2, 3, 1).numpy(), ids)
  out['logits'] = logits(out['image_embeds'], out['text_embeds'], out['logit_scale'],
                         out['logit_bias'])
  return out


def assert_same_embeddings(model, variables, ref, keys=('image_embeds', 'text_embeds', 'logits')):
  x, ids = clt.images(), clt.token_ids()
  ours, theirs = our_outputs(model, variables, x, ids), clt.open_clip_outputs(ref, x, ids)
  errors = {k: clt.rel_err(ours[k], theirs[k]) for k in keys}
  assert max(errors.values()) <= clt.TOL, errors


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_native_openclip_imports_with_same_embeddings_and_logits(variant, tmp_path):
  ref = reference(variant)
  if variant == 'gelu_avg':  # a folder carries its config
    (tmp_path / 'ckpt').mkdir()
    write_state(ref, tmp_path / 'ckpt' / 'open_clip_model.safetensors')
    (tmp_path / 'ckpt' / 'open_clip_config.json').write_text(
        json.dumps({'model_cfg': model_config(variant), 'preprocess_cfg': {}}))
    model, variables = convert.load_clip(f'open_clip:{tmp_path}/ckpt')
  else:  # a bare state dict; the config named by --arch (a JSON file here)
    write_state(ref, tmp_path / 'ckpt.safetensors')
    (tmp_path / 'cfg.json').write_text(json.dumps(model_config(variant)))
    model, variables = convert.load_clip(f'open_clip:{tmp_path}/ckpt.safetensors',
                                         arch=str(tmp_path / 'cfg.json'))
  assert model.visual.norm_pre and not model.visual.patch_bias and model.visual.norm_eps == 1e-5
  assert model.pool == ('mean' if variant == 'gelu_avg' else 'cls')
  assert model.text.act == model.visual.act == ('quick_gelu' if 'quick' in variant else 'gelu')
  assert ('logit_bias' in variables['params']) == ('siglip' in variant)
  assert_same_embeddings(model, variables, ref)


def test_native_export_loads_by_local_dir_with_same_text_and_image_embeddings(tmp_path):
  """Our towers in OpenCLIP's own layout: ``create_model('local-dir:...')`` loads them strictly
  (OpenCLIP 3.3.0 included) and its ``encode_text``/``encode_image`` give our embeddings."""
  model = clt.tiny_clip(num_registers=0, openclip_style=True, init_logit_bias=-10.0)
  variables = clt.random_variables(model, seed=1)
  convert.save_clip(model, variables, f'open_clip:{tmp_path}/out')
  config = json.loads((tmp_path / 'out' / 'open_clip_config.json').read_text())
  assert 'timm_model_name' not in config['model_cfg']['vision_cfg']
  assert config['preprocess_cfg']['size'] == clt.IMG
  ref = open_clip.create_model(f'local-dir:{tmp_path}/out').eval()
  assert isinstance(ref, open_clip.CLIP) and ref.logit_bias is not None
  assert_same_embeddings(model, variables, ref)


@pytest.mark.parametrize('pool,class_token', [('cls', True), ('mean', True), ('mean', False)])
def test_registers_export_to_a_timm_trunk_that_openclip_loads(pool, class_token, tmp_path):
  model = clt.tiny_clip(num_registers=4, pool=pool, class_token=class_token)
  variables = clt.random_variables(model, seed=2)
  convert.save_clip(model, variables, f'open_clip:{tmp_path}/reg_{pool}')
  vision = json.loads((tmp_path / f'reg_{pool}' / 'open_clip_config.json').read_text())[
      'model_cfg']['vision_cfg']
  assert vision['timm_pool'] == {'cls': 'token', 'mean': 'avg'}[pool]
  assert vision['timm_proj'] == 'linear' and vision['timm_proj_bias'] is False
  kwargs = vision['timm_model_kwargs']
  assert kwargs['reg_tokens'] == 4 and kwargs['no_embed_class'] and kwargs['img_size'] == clt.IMG
  state = load_file(tmp_path / f'reg_{pool}' / 'open_clip_model.safetensors')
  assert state['visual.trunk.reg_token'].shape == (1, 4, clt.WIDTH)
  assert ('visual.trunk.cls_token' in state) == class_token
  assert state['visual.trunk.pos_embed'].shape == (1, (clt.IMG // clt.PATCH) ** 2, clt.WIDTH)
  assert state['visual.head.proj.weight'].shape == (clt.EMBED, clt.WIDTH)
  ref = clt.open_clip_from_folder(tmp_path / f'reg_{pool}')
  assert ref.visual.trunk.num_reg_tokens == 4
  assert_same_embeddings(model, variables, ref, keys=('image_embeds', 'text_embeds'))
  # ... and it reads back as the same function.
  loaded, loaded_vars = convert.load_clip(f'open_clip:{tmp_path}/reg_{pool}')
  assert (loaded.pool, loaded.visual.num_registers) == (pool, 4)
  assert loaded.visual.class_token == class_token
  x, ids = clt.images(seed=3).permute(0, 2, 3, 1).numpy(), clt.token_ids(seed=3)
  want, got = model.apply(variables, x, ids), loaded.apply(loaded_vars, x, ids)
  for key in ('image_embeds', 'text_embeds', 'registers', 'patches'):
    assert clt.rel_err(got[key], want[key]) <= clt.TOL, key
  assert clt.rel_err(got['image_pooled'], want['patches'].mean(1) if pool == 'mean'
                     else want['cls']) <= clt.TOL


def test_image_tower_loads_alone_and_exports_to_timm(tmp_path):
  ref = reference('quickgelu_siglip', seed=4)
  write_state(ref, tmp_path / 'ckpt.safetensors')
  (tmp_path / 'cfg.json').write_text(json.dumps(model_config('quickgelu_siglip')))
  spec, arch = f'open_clip:{tmp_path}/ckpt.safetensors', str(tmp_path / 'cfg.json')
  tower, tower_vars = convert.load(spec, arch=arch)
  clip, clip_vars = convert.load_clip(spec, arch=arch)
  assert tower.norm_pre and tower.act == 'quick_gelu' and set(tower_vars) == {'params'}
  x = clt.images(seed=5)
  want = clip.apply(clip_vars, x.permute(0, 2, 3, 1).numpy(), clt.token_ids())
  got = tower.apply(tower_vars, x.permute(0, 2, 3, 1).numpy())
  np.testing.assert_array_equal(got['patches'], want['patches'])
  convert.save(tower, tower_vars, f'timm:{tmp_path}/tower.safetensors')
  # timm's CLIP ViT: pre_norm, no patch bias, torch LayerNorm (eps 1e-5), here QuickGELU.
  trunk = timm.create_model('vit_base_patch16_clip_224', pretrained=False, img_size=clt.IMG,
                            patch_size=clt.PATCH, embed_dim=clt.WIDTH, depth=clt.DEPTH,
                            num_heads=clt.HEADS, init_values=1e-4, num_classes=0,
                            act_layer='quick_gelu').eval()
  trunk.load_state_dict(load_file(tmp_path / 'tower.safetensors'), strict=True)
  with torch.no_grad():
    tokens = trunk.forward_features(x).numpy()
  assert clt.rel_err(got['cls'], tokens[:, 0]) <= clt.TOL
  assert clt.rel_err(got['patches'], tokens[:, 1:]) <= clt.TOL
  with pytest.raises(ConversionError, match='HF Dinov2 models have no norm_pre'):
    convert.save(tower, tower_vars, f'hf:{tmp_path}/hf')


def test_cli_round_trip_is_exact(tmp_path):
  ref = reference('quickgelu_siglip', seed=6)
  write_state(ref, tmp_path / 'ckpt.safetensors')
  (tmp_path / 'cfg.json').write_text(json.dumps(model_config('quickgelu_siglip')))
  assert cli.main(['--from', f'open_clip:{tmp_path}/ckpt.safetensors', '--arch',
                   str(tmp_path / 'cfg.json'), '--to', f'open_clip:{tmp_path}/out']) == 0
  got = load_numpy(tmp_path / 'out' / 'open_clip_model.safetensors')
  want = load_numpy(tmp_path / 'ckpt.safetensors')
  assert set(got) == set(want)
  for name, x in want.items():
    np.testing.assert_array_equal(got[name], x, err_msg=name)
  config = json.loads((tmp_path / 'out' / 'open_clip_config.json').read_text())['model_cfg']
  assert config['quick_gelu'] and config['init_logit_bias'] == -10.0


def test_bad_input_is_refused_naming_key_and_shape(tmp_path):
  ref = reference('gelu_avg', seed=7)
  state = {k: v.detach().clone().contiguous() for k, v in ref.state_dict().items()}
  (tmp_path / 'cfg.json').write_text(json.dumps(model_config('gelu_avg')))
  arch = str(tmp_path / 'cfg.json')

  def load_error(tensors, config=arch):
    save_file(tensors, tmp_path / 'bad.safetensors')
    with pytest.raises(ConversionError) as e:
      convert.load_clip(f'open_clip:{tmp_path}/bad.safetensors', arch=config)
    return str(e.value)

  wrong = dict(state, text_projection=state['text_projection'][:, :-1].contiguous())
  message = load_error(wrong)
  assert f'text_projection: (32, 23), expected (32, {clt.EMBED})' in message
  message = load_error({k: v for k, v in state.items() if k != 'ln_final.weight'})
  assert 'missing (1):' in message and f'ln_final.weight (expected ({clt.TEXT_WIDTH},))' in message
  (tmp_path / 'pool.json').write_text(json.dumps(
      {**model_config('gelu_avg'), 'vision_cfg': {**VISION_CFG, 'attentional_pool': True}}))
  assert 'attentional_pool=True' in load_error(state, str(tmp_path / 'pool.json'))
  (tmp_path / 'timm.json').write_text(json.dumps(
      {**model_config('gelu_avg'), 'vision_cfg': {'timm_model_name': 'vit_base_patch16_224'}}))
  assert 'describes a timm image tower' in load_error(state, str(tmp_path / 'timm.json'))

  model = clt.tiny_clip(num_registers=4)
  variables = clt.random_variables(model)
  with pytest.raises(ConversionError, match=r"it has registers.*use layout='timm'"):
    convert.save_clip(model, variables, f'open_clip:{tmp_path}/x', layout='native')
  with pytest.raises(ConversionError, match=r"no write options \['head'\]"):
    convert.save_clip(model, variables, f'open_clip:{tmp_path}/x', head={})
  with pytest.raises(ConversionError, match='convert.save_clip'):
    convert.save(model.visual, {'params': variables['params']['visual']},
                 f'open_clip:{tmp_path}/x')
  assert not (tmp_path / 'x').exists()
