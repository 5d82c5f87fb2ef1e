"""kNN top-1 of frozen cls features, and the fraction of high-norm patch tokens.

The DINO protocol (REFERENCE §6): the bank is ``eval.train_split``, the queries
``data.eval_split``, both with the eval transform (resize + centre crop);
cosine similarity, k neighbours voting ``exp(sim / T)``. The high-norm fraction
(norm > 4 x the image's median patch norm) on the queries tracks the paper's
artifacts during training.
"""


from vitreg_jax.analysis import features as features_lib
from vitreg_jax.analysis import knn, norms
from vitreg_jax.data import pipeline


class KnnEvaluator:
  """``knn_top1/k{k}``, ``knn_top1`` (best k) and ``val_high_norm_fraction``."""
  name = 'knn'

  def __init__(self, config, select, every: int):
    self.config, self.select, self.every = config, select, every
    self._passes = features_lib.PassCache()

  def run(self, state, mesh, rules) -> dict[str, float]:
    model, variables = self.select(state)
    features = self._passes.get(model, ('cls', 'patch_norms'), mesh, rules)
    ev = self.config.eval
    split = lambda name: pipeline.build_eval_pipeline(self.config, split=name, mesh=mesh)
    bank = features.over(variables, split(ev.train_split), ev.max_train_examples)
    queries = features.over(variables, split(self.config.data.eval_split), ev.max_eval_examples)
    num_classes = int(max(bank['label'].max(), queries['label'].max())) + 1
    accuracy = knn.knn_accuracy(bank['cls'], bank['label'], queries['cls'], queries['label'],
                                num_classes=num_classes, ks=tuple(ev.knn_ks),
                                temperature=ev.knn_temperature)
    metrics = {f'knn_top1/k{k}': 100.0 * acc for k, acc in accuracy.items()}
    metrics['knn_top1'] = max(metrics.values())
    metrics['val_high_norm_fraction'] = float(norms.outlier_fraction(queries['patch_norms']))
    return metrics
