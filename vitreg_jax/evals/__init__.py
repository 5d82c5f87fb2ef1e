"""Periodic evaluators the training loop schedules (``train/recipe.py``: ``Evaluator``).

Each has a ``name``, ``every`` (steps; 0 = only at the end) and
``run(state, mesh, rules) -> {metric: float}``; a recipe builds its evaluators
with a ``select(state) -> (model, variables)`` saying which network to
evaluate (DINOv2's teacher backbone, DeiT-III's classifier ...). Features come
from ``analysis/features.py``, compiled once per evaluator and input shape.

knn             weighted kNN top-1 of the cls token + the high-norm patch fraction
classification  top-1 of a classifier's logits
"""
