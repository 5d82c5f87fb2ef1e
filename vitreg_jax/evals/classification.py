"""Top-1 accuracy of a classifier on ``data.eval_split`` (resize + centre crop)."""

import numpy as np

from vitreg_jax.analysis import features as features_lib
from vitreg_jax.data import pipeline


class ClassificationEvaluator:
  """``top1`` (in %) and ``val_loss`` (mean softmax cross-entropy) of ``select(state)``.

  The selected model returns a dict with ``logits [B, classes]``.
  """
  name = 'classification'

  def __init__(self, config, select, every: int):
    self.config, self.select, self.every = config, select, every
    self._passes = features_lib.PassCache()

  def run(self, state, mesh, rules) -> dict[str, float]:
    model, variables = self.select(state)
    features = self._passes.get(model, ('logits',), mesh, rules)
    batches = pipeline.build_eval_pipeline(self.config, split=self.config.data.eval_split,
                                           mesh=mesh)
    out = features.over(variables, batches, self.config.eval.max_eval_examples)
    logits, labels = out['logits'].astype(np.float64), out['label']
    if labels.max() >= logits.shape[1]:
      raise ValueError(f'label {labels.max()} in {self.config.data.eval_split!r} but the '
                       f'classifier has {logits.shape[1]} classes')
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return {'top1': 100.0 * float(np.mean(logits.argmax(1) == labels)),
            'val_loss': float(-np.mean(log_probs[np.arange(len(labels)), labels]))}
