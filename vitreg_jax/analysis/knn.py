"""Weighted k-nearest-neighbour classification of frozen features (DINO protocol).

Features are L2-normalised, similarity is cosine, and each of the k neighbours
votes for its label with weight ``exp(sim / T)`` (T = 0.07): the protocol of
DINO/DINOv2's ``knn.py`` (REFERENCE §6). Runs in chunks of queries so a large
train bank never makes a ``[queries, bank]`` matrix bigger than one chunk.
"""

import jax
import jax.numpy as jnp
import numpy as np


def _normalise(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_predict(train_features, train_labels, query_features, *, num_classes: int,
                ks=(10, 20), temperature: float = 0.07, chunk: int = 256) -> dict[int, np.ndarray]:
  """Predicted labels of ``query_features`` for each k in ``ks``."""
  train_features = np.asarray(train_features, np.float32)
  train_labels = np.asarray(train_labels)
  if len(train_features) != len(train_labels):
    raise ValueError(f'{len(train_features)} train features but {len(train_labels)} labels')
  k_max = min(max(ks), len(train_features))
  bank = _normalise(jnp.asarray(train_features))
  labels = jnp.asarray(train_labels, jnp.int32)

  @jax.jit
  def votes(q):
    sims = _normalise(q) @ bank.T
    top_sims, top_idx = jax.lax.top_k(sims, k_max)
    weights = jnp.exp(top_sims / temperature)
    onehot = jax.nn.one_hot(labels[top_idx], num_classes)  # [q, k, C]
    # cumulative votes over the first k neighbours, for every k at once
    return jnp.cumsum(weights[..., None] * onehot, axis=1)

  preds = {k: [] for k in ks}
  queries = np.asarray(query_features, np.float32)
  for start in range(0, len(queries), chunk):
    cum = np.asarray(votes(jnp.asarray(queries[start:start + chunk])))
    for k in ks:
      preds[k].append(cum[:, min(k, k_max) - 1].argmax(-1))
  return {k: np.concatenate(v) if v else np.zeros((0,), np.int64) for k, v in preds.items()}


def knn_accuracy(train_features, train_labels, query_features, query_labels, *,
                 num_classes: int, ks=(10, 20), temperature: float = 0.07) -> dict[int, float]:
  """Top-1 accuracy (in [0, 1]) of the weighted kNN classifier for each k."""
  preds = knn_predict(train_features, train_labels, query_features,
                      num_classes=num_classes, ks=ks, temperature=temperature)
  query_labels = np.asarray(query_labels)
  return {k: float((p == query_labels).mean()) for k, p in preds.items()}
