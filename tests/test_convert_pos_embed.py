"""Position-embedding resampling against torch's own ``F.interpolate`` (REFERENCE §1.10).

The converters pick a resampling per source format; these check each path the
model offers against the torch call that format makes.
"""

import convert_testing as ct
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitreg_jax.models.pos_embed import legacy_bicubic_matrix, resample_patch_pos_embed

DIM = 8
# (reference grid M, target h, target w): downsampling, rectangular, upsampling, tiny.
SHAPES = ((37, 16, 16), (37, 16, 22), (37, 40, 50), (16, 37, 37), (7, 3, 5))


def _pos(m: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((m * m, DIM)).astype(np.float32)


def _torch_resample(pos: np.ndarray, m: int, **kwargs) -> np.ndarray:
  grid = torch.from_numpy(pos).reshape(1, m, m, DIM).permute(0, 3, 1, 2)
  out = F.interpolate(grid, mode='bicubic', align_corners=False, **kwargs)
  return out.permute(0, 2, 3, 1).reshape(-1, DIM).numpy()


@pytest.mark.parametrize('m,h,w', SHAPES)
def test_legacy_offset_path_matches_torch_scale_factor(m, h, w):
  """Non-register DINOv2 hub models: scale factor (grid + 0.1) / M, no antialias."""
  pos = _pos(m)
  want = _torch_resample(pos, m, scale_factor=((h + 0.1) / m, (w + 0.1) / m), antialias=False)
  got = np.asarray(resample_patch_pos_embed(pos, (h, w), antialias=False, offset=0.1))
  assert got.shape == want.shape == (h * w, DIM)
  assert ct.rel_err(got, want) <= ct.TOL


@pytest.mark.parametrize('m,h,w', SHAPES)
def test_legacy_size_path_matches_torch_size(m, h, w):
  """HF Dinov2Model: bicubic by size, no antialias."""
  pos = _pos(m, seed=1)
  want = _torch_resample(pos, m, size=(h, w), antialias=False)
  got = np.asarray(resample_patch_pos_embed(pos, (h, w), antialias=False, offset=0.0))
  assert ct.rel_err(got, want) <= ct.TOL


@pytest.mark.parametrize('m,h,w', SHAPES)
def test_antialias_path_matches_torch_antialias(m, h, w):
  """Register models, timm, HF Dinov2WithRegisters: antialiased bicubic by size."""
  pos = _pos(m, seed=2)
  want = _torch_resample(pos, m, size=(h, w), antialias=True)
  got = np.asarray(resample_patch_pos_embed(pos, (h, w), antialias=True))
  assert ct.rel_err(got, want) <= ct.TOL


@pytest.mark.parametrize('n_in,scale',
                         [(37, 16.1 / 37), (37, 22.1 / 37), (16, 37.1 / 16), (5, 2.0)])
def test_legacy_matrix_is_torch_bicubic_in_one_dimension(n_in, scale):
  """Row i of the matrix is torch's response to a unit impulse at each source pixel.

  torch computes source coordinates and Keys coefficients in float32, the
  matrix in float64: weights differ by up to ~2e-6 (measured 2.2e-6 at 37->16).
  """
  n_out = int(np.floor(n_in * scale))
  impulses = torch.eye(n_in).reshape(n_in, 1, 1, n_in)  # one 1xN image per source pixel
  response = F.interpolate(impulses, scale_factor=(1.0, scale), mode='bicubic',
                           align_corners=False).reshape(n_in, n_out)
  np.testing.assert_allclose(legacy_bicubic_matrix(n_in, n_out, scale), response.T.numpy(),
                             rtol=0, atol=5e-6)


def test_same_grid_is_returned_unchanged():
  pos = _pos(37, seed=3)
  assert resample_patch_pos_embed(pos, (37, 37), antialias=False, offset=0.1) is pos
