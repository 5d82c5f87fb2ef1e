"""Classification losses of supervised ViT recipes (DeiT-III, REFERENCE §8).

* ``soft_target_cross_entropy``: ``-sum(t * log_softmax(logits))`` averaged
  over the batch; with mixed (Mixup/CutMix) and label-smoothed targets this is
  timm's ``SoftTargetCrossEntropy``, the IN-21k recipe's loss.
* ``binary_cross_entropy``: DeiT-III's ``--bce-loss`` (the IN-1k recipe):
  the mixed targets are binarised (``> 0`` -> 1, both mix partners positive)
  and scored by sigmoid BCE averaged over batch and classes
  (torch ``BCEWithLogitsLoss``'s mean).

Computed in float32.
"""

import jax
import jax.numpy as jnp

LOSSES = ('soft_ce', 'bce')


def soft_target_cross_entropy(logits, targets):
  logits = logits.astype(jnp.float32)
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def binary_cross_entropy(logits, targets):
  logits = logits.astype(jnp.float32)
  binary = (targets > 0).astype(jnp.float32)
  # log(sigmoid(x)) = -softplus(-x), log(1 - sigmoid(x)) = -softplus(x): stable for any x
  return jnp.mean(binary * jax.nn.softplus(-logits) + (1.0 - binary) * jax.nn.softplus(logits))


def classification_loss(name: str, logits, targets):
  if name == 'soft_ce':
    return soft_target_cross_entropy(logits, targets)
  if name == 'bce':
    return binary_cross_entropy(logits, targets)
  raise ValueError(f'loss={name!r}; valid: {LOSSES}')
