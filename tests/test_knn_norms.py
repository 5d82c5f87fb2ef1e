"""kNN protocol and token-norm metrics against direct NumPy formulas."""

import numpy as np
import pytest

from vitreg_jax.analysis import knn, norms


def _numpy_knn(train, train_labels, queries, k, temperature, num_classes):
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  preds = []
  for q in queries:
    sims = train @ (q / np.linalg.norm(q))
    order = np.argsort(-sims, kind='stable')[:k]
    votes = np.zeros(num_classes)
    for i in order:
      votes[train_labels[i]] += np.exp(sims[i] / temperature)
    preds.append(votes.argmax())
  return np.array(preds)


def test_knn_matches_numpy_reference():
  rng = np.random.default_rng(0)
  centers = rng.standard_normal((5, 16))
  train_labels = rng.integers(0, 5, 300)
  train = centers[train_labels] + 0.8 * rng.standard_normal((300, 16))
  query_labels = rng.integers(0, 5, 70)
  queries = centers[query_labels] + 0.8 * rng.standard_normal((70, 16))
  preds = knn.knn_predict(train, train_labels, queries, num_classes=5, ks=(1, 10, 20), chunk=32)
  for k in (1, 10, 20):
    np.testing.assert_array_equal(preds[k], _numpy_knn(train, train_labels, queries, k, 0.07, 5))
  acc = knn.knn_accuracy(train, train_labels, queries, query_labels, num_classes=5, ks=(10,))
  assert acc[10] == pytest.approx(np.mean(preds[10] == query_labels))
  assert acc[10] > 0.8  # well-separated clusters


def test_knn_k_larger_than_bank_and_bad_input():
  train = np.eye(3, dtype=np.float32)
  preds = knn.knn_predict(train, [0, 1, 2], np.array([[1.0, 0.1, 0.0]]), num_classes=3, ks=(20,))
  assert preds[20].tolist() == [0]
  with pytest.raises(ValueError, match='3 train features but 2 labels'):
    knn.knn_predict(train, [0, 1], train, num_classes=3)


def test_high_norm_fraction():
  patches = np.ones((2, 10, 4), np.float32)  # norm 2
  patches[0, 3] *= 100  # norm 200
  assert float(norms.high_norm_fraction(patches, cutoff=150.0)) == pytest.approx(1 / 20)
  assert float(norms.high_norm_fraction(patches)) == pytest.approx(1 / 20)
  np.testing.assert_allclose(norms.token_norms(patches)[0, 3], 200.0, rtol=1e-6)
