"""Linear probes: near-perfect on planted linear structure, near chance on random labels;
ridge regression against NumPy's least squares; DINOv2 feature layout."""

import numpy as np
import pytest

from vitreg_jax.analysis import probes


def planted(n, d=8, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(d, classes))
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x, (x @ w).argmax(1)


def test_planted_linear_structure_is_recovered():
  x, y = planted(2000)
  result = probes.linear_probe(x[:1400], y[:1400], x[1400:], y[1400:], num_classes=4,
                               epochs=100, batch_size=64)
  assert result['top1'] >= 0.95, result['per_lr']
  assert result['top1'] == result['per_lr'][result['best_lr']]
  assert (result['predictions'] == y[1400:]).mean() == pytest.approx(result['top1'])


def test_random_labels_stay_near_chance():
  x, _ = planted(1200, seed=1)
  y = np.random.default_rng(2).integers(0, 4, len(x))
  result = probes.linear_probe(x[:800], y[:800], x[800:], y[800:], num_classes=4, epochs=60,
                               batch_size=64)
  # 400 val images: chance 0.25, 2 sd = 0.043; the best of 13 lrs on val adds a little
  assert result['top1'] <= 0.25 + 0.08, result['per_lr']


def test_ridge_matches_least_squares():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 6))
  y = x @ rng.normal(size=(6, 3)) + 0.5
  w, b = probes.ridge_regression(x, y, alpha=0.0)
  design = np.concatenate([x, np.ones((200, 1))], axis=1)
  coef = np.linalg.lstsq(design, y, rcond=None)[0]
  np.testing.assert_allclose(w, coef[:6], atol=1e-8)
  np.testing.assert_allclose(b, coef[6], atol=1e-8)


def test_dinov2_feature_layout():
  cls_layers = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)  # [L, N, D]
  mean = np.full((2, 3), -1.0)
  got = probes.dinov2_features(cls_layers, 4, mean)
  np.testing.assert_array_equal(got[:, :12], np.concatenate(list(cls_layers[1:]), axis=-1))
  np.testing.assert_array_equal(got[:, 12:], mean)
  assert probes.dinov2_features(cls_layers, 1).shape == (2, 3)
  with pytest.raises(ValueError, match='5 blocks'):
    probes.dinov2_features(cls_layers, 6)
