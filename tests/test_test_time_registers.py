"""Test-time registers: the edit against NumPy, off == plain model bit for bit, parity of the
search and the edited forward with a PyTorch reference of the official algorithm on a random
timm ViT, and a planted model whose artifacts the search finds and the token removes."""

import json
import os

import jax
import numpy as np
from PIL import Image
import pytest
import torch

from vitreg_jax import convert
from vitreg_jax.analysis import cli, register_neurons
from vitreg_jax.models import layers, test_time_registers
from vitreg_jax.models.vit import VisionTransformer, get_arch

import analysis_testing
import convert_testing

TOL = 1e-5


def signed_max(values):
  """The entry of largest magnitude, sign kept."""
  flat = values.ravel()
  return flat[np.abs(flat).argmax()]


@pytest.mark.parametrize('mode', ['zero', 'mean', 'only_outliers', 'same'])
def test_edit_matches_numpy(mode):
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(3, 20, 12)).astype(np.float32)  # [cls, reg, tt, tt, 16 patches]
  neurons = (2, 7, 5)
  edit = layers.NeuronEdit(neurons, keep=2, num_tokens=2, scale=0.5, mode=mode)
  got = np.asarray(edit(hidden))
  want = hidden.copy()
  for b in range(3):
    s = signed_max(hidden[b][:, list(neurons)])  # all tokens x the neurons, per image
    for n in neurons:
      want[b, 2:4, n] = 0.5 * s
      patches = hidden[b, 4:, n]
      if mode == 'zero':
        want[b, 4:, n] = 0.0
      elif mode == 'mean':
        want[b, 4:, n] = patches.mean()
      elif mode == 'only_outliers':  # the official: > mean + torch.std (unbiased) -> mean
        high = patches > patches.mean() + patches.std(ddof=1)
        want[b, 4:, n] = np.where(high, patches.mean(), patches)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
  assert (got[:, :2] == hidden[:, :2]).all()  # cls and trained registers untouched


def tiny(**kw):
  return VisionTransformer(patch_size=8, embed_dim=32, depth=3, num_heads=2, num_registers=2,
                           img_size=32, layerscale_init=0.5, **kw)


def test_off_is_bit_identical_and_bad_settings_are_named():
  model = tiny()
  variables = cli.random_variables(model, 0)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  plain = jax.jit(model.apply)(variables, x)
  off = tiny(num_test_time_registers=0, register_neurons=(), neuron_scale=2.0)
  for name, value in jax.jit(off.apply)(variables, x).items():
    if value is not None:
      assert (np.asarray(value) == np.asarray(plain[name])).all(), name
  with pytest.raises(ValueError, match='layer 5 of a 3-block'):
    tiny(num_test_time_registers=1, register_neurons=((5, (1,)),)).apply(variables, x)
  with pytest.raises(ValueError, match='outside the MLP width 128'):
    tiny(num_test_time_registers=1, register_neurons=((1, (1, 300)),)).apply(variables, x)
  with pytest.raises(ValueError, match='num_test_time_registers >= 1'):
    tiny(register_neurons=((1, (1,)),)).apply(variables, x)


# ---- a PyTorch reference of the official algorithm, on timm's VisionTransformer ----

def torch_search(model, images, detect_layer, threshold, sparsity=False):
  """Per image (batched): outliers = tokens with block-``detect_layer`` output norm above
  ``threshold``; score = mean |GELU output| over them (with ``sparsity``: 0 unless the neuron
  is below 0.5 on >= half the image's tokens); mean over images with outliers."""
  acts, outs = {}, {}
  hooks = [b.mlp.act.register_forward_hook(lambda m, i, o, l=l: acts.__setitem__(l, o))
           for l, b in enumerate(model.blocks)]
  hooks.append(model.blocks[detect_layer].register_forward_hook(
      lambda m, i, o: outs.__setitem__('x', o)))
  with torch.no_grad():
    model.forward_features(images)
  for h in hooks:
    h.remove()
  outliers = outs['x'].norm(dim=-1) > threshold                  # [B, T]
  signed = torch.stack([acts[l] for l in range(len(model.blocks))], 1)  # [B, L, T, H]
  hidden = signed.abs()
  has = outliers.any(-1)
  count = outliers.sum(-1).clamp(min=1)[:, None, None]
  score = (hidden * outliers[:, None, :, None]).sum(2) / count
  if sparsity:
    score = score * ((signed < 0.5).float().mean(2) >= 0.5)
  return (score[has].sum(0) / has.sum()).numpy()


def torch_edited_forward(model, images, neurons: dict):
  """One zero token appended after the position embedding ([cls, patches, tt]); on each
  listed layer's GELU output, per image: s = signed max over all tokens x the layer's
  neurons, tt <- s, patches <- 0, cls untouched."""
  def hook(module, inputs, out, idx):
    out = out.clone()
    sel = out[:, :, idx]
    flat = sel.reshape(len(out), -1)
    s = flat.gather(1, flat.abs().argmax(1, keepdim=True))        # [B, 1]
    out[:, -1, idx] = s
    out[:, 1:-1, idx] = 0.0
    return out
  hooks = [model.blocks[l].mlp.act.register_forward_hook(
      lambda m, i, o, idx=torch.tensor(v): hook(m, i, o, idx)) for l, v in neurons.items()]
  with torch.no_grad():
    x = model._pos_embed(model.patch_embed(images))  # pylint: disable=protected-access
    x = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
    x = model.norm(model.blocks(model.norm_pre(x)))
  for h in hooks:
    h.remove()
  return x.numpy()


@pytest.mark.parametrize('sparsity', [False, True])
def test_search_and_edit_match_the_torch_reference(tmp_path, one_torch_thread, sparsity):
  timm_model = convert_testing.timm_model('noreg', seed=3, img_size=56, patch_size=14)
  path = tmp_path / 'timm.safetensors'
  import safetensors.torch  # pylint: disable=import-outside-toplevel
  safetensors.torch.save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()},
                              str(path))
  model, variables = convert.load(f'timm:{path}')
  images = np.random.default_rng(0).normal(size=(4, 56, 56, 3)).astype(np.float32)
  torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  # a threshold that makes some tokens of some images outliers
  with torch.no_grad():
    norms = timm_model.blocks[:1](timm_model._pos_embed(  # pylint: disable=protected-access
        timm_model.patch_embed(torch_images))).norm(dim=-1)
  threshold = float(np.quantile(norms.numpy(), 0.8))
  want = torch_search(timm_model, torch_images, 0, threshold, sparsity)
  got, images_with = register_neurons.neuron_scores(
      model, variables, [{'image': images}], detect_layer=0, threshold=threshold,
      sparsity_filter=sparsity)
  if sparsity:  # the filter zeroes some scores, not all
    assert 0 < (want == 0).mean() < 1
  assert 0 < images_with
  np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * np.abs(want).max())
  ranked = register_neurons.rank(got, highest_layer=1, top_k=12)
  want_ranked = register_neurons.rank(want, highest_layer=1, top_k=12)
  assert [(l, n) for l, n, _ in ranked] == [(l, n) for l, n, _ in want_ranked]
  neurons = register_neurons.group(ranked)

  edited = test_time_registers.apply(model, {'layers': neurons})
  out = jax.jit(edited.apply)(variables, images)
  ref = torch_edited_forward(timm_model, torch_images, neurons)
  scale = np.abs(ref).max()
  np.testing.assert_allclose(out['patches'], ref[:, 1:-1], atol=TOL * scale, rtol=0)
  np.testing.assert_allclose(out['cls'], ref[:, 0], atol=TOL * scale, rtol=0)
  np.testing.assert_allclose(out['test_time_registers'][:, 0], ref[:, -1], atol=TOL * scale, rtol=0)
  # the edit changed something: without it the patches differ
  plain = jax.jit(model.apply)(variables, images)['patches']
  assert np.abs(np.asarray(plain) - ref[:, 1:-1]).max() > 100 * TOL * scale


# ---- the planted case ----

PLANTED_NEURON = (1, 5)  # block 1, MLP neuron 5


def planted_model():
  """Channel-0-bright patches (analysis_testing.planted_images) drive neuron 5 of block 1,
  whose output row writes 50 into embedding dim 1: those patches leave block 1 with a norm
  of several hundred, the rest stay at about one."""
  model = VisionTransformer(patch_size=8, embed_dim=16, depth=3, num_heads=2, num_registers=0,
                            img_size=32, layerscale_init=1.0)
  params = jax.tree.map(np.array, cli.random_variables(model, 0)['params'])
  proj = params['patch_embed']['proj']
  proj['kernel'][:] = 0.0
  proj['kernel'][:, :, 0, 0] = 0.05
  proj['bias'][:] = 0.0
  proj['bias'][2] = 1.0  # every patch points along dim 2; bright ones also along dim 0
  layer, neuron = PLANTED_NEURON
  mlp = params[f'blocks_{layer}']['mlp']
  mlp['fc1']['kernel'][:, neuron] = 0.0
  mlp['fc1']['kernel'][0, neuron] = 5.0
  mlp['fc1']['bias'][neuron] = -12.0
  mlp['fc2']['kernel'][neuron, :] = 0.0
  mlp['fc2']['kernel'][neuron, 1] = 50.0
  return model, {'params': params}


def test_planted_register_neuron_is_found_and_the_token_takes_the_artifacts(tmp_path):
  model, variables = planted_model()
  images = analysis_testing.planted_images(4, np.random.default_rng(0))
  folder = tmp_path / 'images' / 'val' / 'a'
  folder.mkdir(parents=True)
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f'{i}.png')
  convert.save(model, variables, f'vitreg:{tmp_path}/model')
  common = ['--model', f'vitreg:{tmp_path}/model', '--data', f'folder:{tmp_path}/images',
            '--size', '32', '--batch-size', '4']
  run = analysis_testing.experiment('test_time_registers').main
  run(['find', *common, '--detect-layer', '-1', '--top-k', '1', '--out', str(tmp_path / 'find')])
  found = test_time_registers.load(str(tmp_path / 'find' / 'register_neurons.json'))
  assert found['layers'] == {PLANTED_NEURON[0]: [PLANTED_NEURON[1]]}
  run(['report', *common, '--tt-registers', str(tmp_path / 'find' / 'register_neurons.json'),
       '--out', str(tmp_path / 'report')])
  without, with_tt = json.loads((tmp_path / 'report' / 'report.json').read_text())
  planted = len(analysis_testing.PLANTED) / analysis_testing.GRID ** 2
  assert without['outlier %'] == pytest.approx(100 * planted)
  assert with_tt['outlier %'] == 0.0
  assert with_tt['max patch norm'] < without['max patch norm'] / 10
  assert with_tt['test-time token norm'] > without['max patch norm'] / 2
  for name in ('without', 'with'):
    assert os.path.getsize(tmp_path / 'report' / name / 'artifacts' / 'norm_histogram.png') > 0


def test_shipped_dinov2_list_applies_to_a_vitl14():
  data = test_time_registers.load('dinov2_vitl14')
  assert sum(len(v) for v in data['layers'].values()) == 45
  assert sorted(data['layers']) == [12, 13, 14, 15, 16, 17]
  assert data['layers'][17][:3] == [884, 133, 1427]
  model = test_time_registers.apply(get_arch('vitl14'), 'dinov2_vitl14')
  assert model.num_test_time_registers == 1 and model.num_prefix_tokens == 2
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3),
                                                                                np.float32))
  assert shapes['params']['blocks_17']['mlp']['fc1']['kernel'].value.shape[-1] == 4096
  with pytest.raises(ValueError, match='not a shipped list'):
    test_time_registers.load('dinov2_vitg14')


def test_edit_shards_over_the_batch_with_per_image_maxima():
  """8 images on 8 simulated devices (one per device) == one device: the signed max is per
  image, never a batch-wide or batch-element-0 value."""
  from vitreg_jax.analysis.features import FeaturePass  # pylint: disable=import-outside-toplevel
  model, variables = planted_model()
  edited = test_time_registers.apply(model, {'layers': {PLANTED_NEURON[0]: [PLANTED_NEURON[1]]}})
  images = analysis_testing.planted_images(8, np.random.default_rng(0)).astype(np.float32) / 255
  images[::2] *= 0.5  # images differ in their maxima
  mesh, rules = cli.mesh_and_rules()
  assert mesh.size == 8
  outputs = ('patches', 'test_time_registers')
  batch = jax.device_put(images, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(('data', 'fsdp'))))
  sharded = FeaturePass(edited, outputs, mesh, rules)(variables, batch)
  single = FeaturePass(edited, outputs)(variables, images)
  for name in outputs:
    np.testing.assert_allclose(sharded[name], single[name], atol=1e-5, rtol=1e-5)
  tokens = np.asarray(single['test_time_registers'])[:, 0]
  assert not np.allclose(tokens[0], tokens[1])  # per image
