"""Retrieval recall@k against a hand-computed case and a direct per-query loop."""

import numpy as np
import pytest

from vitreg_jax.evals import retrieval


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_hand_computed_recall():
  # image 0 matches caption 0 best; image 1 prefers caption 0, its own is second;
  # image 2 prefers caption 1, its own is second.
  images = np.eye(3, dtype=np.float32)
  texts = np.array([[1.0, 0.9, 0.0], [0.0, 0.5, 0.4], [0.3, 0.2, 0.1]], np.float32)
  # similarity rows: [1, 0, .3], [.9, .5, .2], [0, .4, .1]
  result = retrieval.recall_at_k(images, texts, ks=(1, 2))
  assert result['image_to_text_r@1'] == pytest.approx(100 / 3)   # only image 0
  assert result['image_to_text_r@2'] == pytest.approx(100.0)     # + images 1 and 2
  # columns: caption 0 [1, .9, 0] -> image 0 first; caption 1 [0, .5, .4] -> image 1 first;
  # caption 2 [.3, .2, .1] -> image 2 third
  assert result['text_to_image_r@1'] == pytest.approx(200 / 3)
  assert result['text_to_image_r@2'] == pytest.approx(200 / 3)
  np.testing.assert_array_equal(retrieval.top_matches(images, texts, k=2), [[0, 2], [0, 1], [1, 2]])


def test_matches_a_per_query_loop_and_ties_count_against():
  rng = np.random.default_rng(0)
  images, texts = _unit(rng.normal(size=(50, 8))), _unit(rng.normal(size=(50, 8)))
  texts[:25] = _unit(images[:25] + 0.3 * rng.normal(size=(25, 8)))
  result = retrieval.recall_at_k(images, texts, ks=(1, 5))
  for k in (1, 5):
    hits = [i in np.argsort(-(images[i] @ texts.T))[:k] for i in range(50)]
    assert result[f'image_to_text_r@{k}'] == pytest.approx(100 * np.mean(hits))
    hits = [i in np.argsort(-(texts[i] @ images.T))[:k] for i in range(50)]
    assert result[f'text_to_image_r@{k}'] == pytest.approx(100 * np.mean(hits))
  constant = np.ones((4, 3), np.float32) / np.sqrt(3)
  assert max(retrieval.recall_at_k(constant, constant, ks=(1, 3)).values()) == 0.0


def test_unpaired_shapes_are_refused():
  with pytest.raises(ValueError, match=r'paired \[N, E\].*\(3, 4\).*\(2, 4\)'):
    retrieval.recall_at_k(np.ones((3, 4)), np.ones((2, 4)))
