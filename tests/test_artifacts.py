"""High-norm tokens: a planted model's known outliers found exactly, the valley cutoff on
synthetic distributions, neighbour cosine and the location statistics against NumPy."""

import json
import os

import jax
import numpy as np
from PIL import Image
import pytest

from vitreg_jax import convert
from vitreg_jax.analysis import artifacts, cli
from vitreg_jax.analysis.features import FeaturePass, neighbour_cosine
from vitreg_jax.models.vit import VisionTransformer

import analysis_testing

PATCH, GRID, PLANTED = analysis_testing.PATCH, analysis_testing.GRID, analysis_testing.PLANTED
planted_images = analysis_testing.planted_images


def planted_model():
  """Blocks switched off (LayerScale 0: identity), the patch projection reads channel 0 into
  embedding dim 0: a patch of bright channel 0 gets norm ~ 64 x 2.25, the rest ~0."""
  model = VisionTransformer(patch_size=PATCH, embed_dim=16, depth=2, num_heads=2,
                            num_registers=2, img_size=PATCH * GRID, layerscale_init=0.0)
  variables = cli.random_variables(model, 0)
  params = jax.tree.map(np.array, variables['params'])
  kernel = np.zeros_like(params['patch_embed']['proj']['kernel'])
  kernel[:, :, 0, 0] = 1.0
  params['patch_embed']['proj']['kernel'] = kernel
  params['patch_embed']['proj']['bias'][:] = 0.0
  return model, {'params': params}


def test_planted_outliers_are_found_exactly():
  model, variables = planted_model()
  images = planted_images(3, np.random.default_rng(0))
  x = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  out = FeaturePass(model, ('prenorm_norms', 'layer_norms'))(variables, x.astype(np.float32))
  patches = np.asarray(out['prenorm_norms'])[:, model.num_prefix_tokens:]
  cutoff = artifacts.valley_cutoff(patches)
  assert cutoff is not None
  found = [set(np.flatnonzero(row)) for row in artifacts.outlier_mask(patches, cutoff)]
  assert found == [set(PLANTED)] * 3
  # with the blocks as identities every layer sees them
  for layer in np.asarray(out['layer_norms']):
    assert set(np.flatnonzero(layer[0, model.num_prefix_tokens:] > cutoff)) == set(PLANTED)


def test_artifacts_cli_reports_the_planted_outliers(tmp_path):
  model, variables = planted_model()
  convert.save(model, variables, f'vitreg:{tmp_path}/model')
  folder = tmp_path / 'images' / 'val' / 'class0'
  folder.mkdir(parents=True)
  for i, image in enumerate(planted_images(4, np.random.default_rng(1))):
    Image.fromarray(image).save(folder / f'{i}.png')
  out = tmp_path / 'out'
  analysis_testing.experiment('artifacts').main([
      '--model', f'vitreg:{tmp_path}/model', '--data', f'folder:{tmp_path}/images',
      '--size', str(PATCH * GRID), '--out', str(out), '--batch-size', '8'])
  result = json.loads((out / 'artifacts.json').read_text())
  before = result['before_final_norm']
  assert before['outlier_fraction'] == len(PLANTED) / GRID ** 2
  assert before['outliers_on_border'] == 3 / 4
  assert before['patches_on_border'] == 12 / 16
  assert result['images'] == 4
  for name in ('norm_histogram.png', 'layer_norms.png', 'results.md'):
    assert os.path.getsize(out / name) > 0


def test_valley_cutoff_separates_a_bimodal_distribution():
  rng = np.random.default_rng(0)
  normal = np.exp(rng.normal(np.log(10.0), 0.15, 20000))
  outliers = np.exp(rng.normal(np.log(120.0), 0.1, 480))  # 2.3%, like DINOv2-g
  cutoff = artifacts.valley_cutoff(np.concatenate([normal, outliers]))
  assert normal.max() < cutoff < outliers.min()
  # one mode, or a long tail without a second mode: no cutoff
  assert artifacts.valley_cutoff(normal) is None
  assert artifacts.valley_cutoff(np.exp(rng.exponential(0.5, 20000))) is None


def test_neighbour_cosine_matches_a_loop():
  rng = np.random.default_rng(0)
  tokens = rng.normal(size=(2, 3 * 5, 4)).astype(np.float32)
  got = np.asarray(neighbour_cosine(tokens, (3, 5)))
  grid = tokens.reshape(2, 3, 5, 4)
  unit = grid / np.linalg.norm(grid, axis=-1, keepdims=True)
  for b in range(2):
    for r in range(3):
      for c in range(5):
        cos = [unit[b, r, c] @ unit[b, rr, cc] for rr, cc in
               ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)) if 0 <= rr < 3 and 0 <= cc < 5]
        assert got[b, r * 5 + c] == pytest.approx(np.mean(cos), abs=1e-5)


def test_location_masks_by_hand():
  np.testing.assert_array_equal(artifacts.border_mask((3, 3)).reshape(3, 3),
                                [[1, 1, 1], [1, 0, 1], [1, 1, 1]])
  # a box over the left half of a 2 x 4 grid: centres x = 1/8, 3/8 inside
  np.testing.assert_array_equal(artifacts.background_mask([[0, 0, 0.5, 1]], (2, 4)).reshape(2, 4),
                                [[0, 0, 1, 1], [0, 0, 1, 1]])
  outliers = np.array([[True, False, False, True, False, False, False, False]])
  stats = artifacts.where_outliers_sit(outliers, (2, 4), [np.array([[0, 0, 0.5, 1]])])
  assert stats['outliers_on_border'] == 1.0
  assert stats['outliers_in_background'] == 0.5 and stats['patches_in_background'] == 0.5


def test_registers_statistics():
  regs = np.array([[100.0, 1.0], [120.0, 2.0]])
  stats = artifacts.register_statistics(regs, np.full((2, 4), 10.0), cutoff=50.0)
  assert stats['num_registers'] == 2 and stats['above_patch_cutoff'] == 0.5
  assert stats['per_register'][0]['mean'] == 110.0
