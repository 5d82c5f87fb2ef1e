"""Periodic evaluation of a self-supervised run: kNN top-1 and token-norm outliers.

Features are the teacher backbone's normed cls token (REFERENCE §6); the bank
is ``eval.train_split`` and the queries ``data.eval_split``, both with the eval
transform (resize + centre crop). Every process embeds its shard of each batch;
the features are then gathered so every process scores the same kNN.
"""

import jax
from jax.experimental import multihost_utils
import numpy as np

from vitreg_jax.analysis import knn, norms
from vitreg_jax.data import pipeline
from vitreg_jax.parallel import rules as rules_lib


def _embed_split(embed, variables, config, split, mesh, max_examples):
  feats, labels, outlier_fractions = [], [], []
  seen = 0
  for batch in pipeline.build_eval_pipeline(config, split=split, mesh=mesh):
    cls, high_norm = embed(variables, batch['image'])
    gathered = multihost_utils.process_allgather(
        {'cls': cls, 'label': batch['label'], 'valid': batch['valid']}, tiled=True)
    keep = np.asarray(gathered['valid']).astype(bool)
    feats.append(np.asarray(gathered['cls'])[keep])
    labels.append(np.asarray(gathered['label'])[keep])
    outlier_fractions.append(float(high_norm))
    seen += int(keep.sum())
    if max_examples and seen >= max_examples:
      break
  feats, labels = np.concatenate(feats), np.concatenate(labels)
  if max_examples:
    feats, labels = feats[:max_examples], labels[:max_examples]
  return feats, labels, float(np.mean(outlier_fractions))


def knn_evaluation(model, variables, config, mesh, rules) -> dict[str, float]:
  """``{'knn_top1/k10': ..., 'val_high_norm_fraction': ...}`` for the backbone ``model``."""
  def features(variables, images):
    with rules_lib.activate(mesh, rules):
      out = model.apply(variables, images)
    return out['cls'], norms.high_norm_fraction(out['patches'])

  embed = jax.jit(features)
  ev = config.eval
  bank, bank_labels, _ = _embed_split(embed, variables, config, ev.train_split, mesh,
                                      ev.max_train_examples)
  queries, query_labels, outliers = _embed_split(embed, variables, config,
                                                 config.data.eval_split, mesh, ev.max_eval_examples)
  num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
  accuracy = knn.knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=num_classes,
                              ks=tuple(ev.knn_ks), temperature=ev.knn_temperature)
  metrics = {f'knn_top1/k{k}': 100.0 * acc for k, acc in accuracy.items()}
  metrics['knn_top1'] = max(metrics.values())
  metrics['val_high_norm_fraction'] = outliers
  return metrics
